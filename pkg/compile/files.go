package compile

import (
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// FileStat is what compiling needs of a file.
type FileStat struct {
	ID      dataplane.FileID
	Regular bool
	// Changed is the file's change time (ctime) in nanoseconds since the epoch, as the exec hook
	// compares it.
	Changed int64
}

// Files resolves paths to the files the kernel will see.
type Files interface {
	// Stat follows symlinks and returns the file's identity, type and change time.
	Stat(path string) (FileStat, error)
	// Digest returns the SHA-256 of the file's content with the identity and change time it had
	// while it was read (the same before and after, or an error).
	Digest(path string) (FileStat, [sha256.Size]byte, error)
	// Glob expands a pattern (filepath.Match syntax).
	Glob(pattern string) ([]string, error)
	// Resolve is path with the symbolic links of its directories resolved, as far as they
	// exist (/var/run/x.sock is /run/x.sock on most hosts): what a socket path reaches.
	Resolve(path string) string
	// WorldWritable reports whether the file or directory is writable by every user.
	WorldWritable(path string) bool
}

// OS resolves paths on this host.
type OS struct{}

// Stat identifies a file the way the exec hook sees it: its inode and the device of its
// superblock (super_block.s_dev), which mountinfo lists for the file's mount. stat's st_dev is
// not always that: on btrfs it is the subvolume's own anonymous device.
func (OS) Stat(path string) (FileStat, error) {
	return statx(unix.AT_FDCWD, path, 0)
}

func statx(dirfd int, path string, flags int) (FileStat, error) {
	st, err := statxRaw(dirfd, path, flags)
	if err == nil && st.mntID != 0 {
		if dev, ok := mounts.deviceIn(0, st.mntID); ok {
			st.ID.Dev = dev
		}
	}
	return st.FileStat, err
}

// rawStat is a file's statx, its device still stat's (mntID names its mount, 0 when unknown).
type rawStat struct {
	FileStat
	mntID uint64
}

func statxRaw(dirfd int, path string, flags int) (rawStat, error) {
	var stx unix.Statx_t
	if err := unix.Statx(dirfd, path, flags, unix.STATX_TYPE|unix.STATX_INO|unix.STATX_CTIME|unix.STATX_MNT_ID, &stx); err != nil {
		return rawStat{}, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	st := rawStat{FileStat: FileStat{
		ID:      dataplane.FileID{Dev: unix.Mkdev(stx.Dev_major, stx.Dev_minor), Ino: stx.Ino},
		Regular: stx.Mode&unix.S_IFMT == unix.S_IFREG,
		Changed: stx.Ctime.Sec*1e9 + int64(stx.Ctime.Nsec),
	}}
	if stx.Mask&unix.STATX_MNT_ID != 0 {
		st.mntID = stx.Mnt_id
	}
	return st, nil
}

func (OS) Digest(path string) (FileStat, [sha256.Size]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return FileStat{}, [sha256.Size]byte{}, err
	}
	defer f.Close()
	return digest(f, func(fd int) (FileStat, error) { return statx(fd, "", unix.AT_EMPTY_PATH) })
}

// digest is the SHA-256 of open file f's content, with the identity stat gives it: the same
// before and after the read, or an error (it was written meanwhile).
func digest(f *os.File, stat func(fd int) (FileStat, error)) (FileStat, [sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	before, err := stat(int(f.Fd()))
	if err != nil {
		return before, sum, err
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return before, sum, fmt.Errorf("reading %s: %w", f.Name(), err)
	}
	after, err := stat(int(f.Fd()))
	if err != nil {
		return before, sum, err
	}
	if after != before {
		return before, sum, fmt.Errorf("%s changed while its digest was taken", f.Name())
	}
	h.Sum(sum[:0])
	return before, sum, nil
}

func (OS) Glob(pattern string) ([]string, error) { return filepath.Glob(pattern) }

func (OS) Resolve(path string) string {
	dir, base := filepath.Split(filepath.Clean(path))
	for rest := ""; dir != "/" && dir != ""; {
		if real, err := filepath.EvalSymlinks(dir); err == nil {
			return filepath.Join(real, rest, base)
		}
		parent, last := filepath.Split(strings.TrimSuffix(dir, "/"))
		dir, rest = parent, filepath.Join(last, rest)
	}
	return filepath.Clean(path)
}

func (OS) WorldWritable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().Perm()&0o002 != 0
}

// mountDevices maps mount ids to their superblock's device, from a mount table (mountinfo); it
// is read again when an id is not known.
type mountDevices struct {
	mu   sync.Mutex
	devs map[uint64]uint64
}

var mounts mountDevices

// deviceIn is the device of mount mntID, as the mount table of process pid says (0: tetherd's).
func (m *mountDevices) deviceIn(pid int, mntID uint64) (uint64, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if dev, ok := m.devs[mntID]; ok {
		return dev, true
	}
	var infos []*procfs.MountInfo
	var err error
	if pid == 0 {
		infos, err = procfs.GetMounts()
	} else {
		infos, err = procfs.GetProcMounts(pid)
	}
	if err != nil {
		return 0, false
	}
	m.devs = mountDevicesOf(infos)
	dev, ok := m.devs[mntID]
	return dev, ok
}

// mountDevicesOf maps the mount ids of infos to their MAJOR:MINOR device.
func mountDevicesOf(infos []*procfs.MountInfo) map[uint64]uint64 {
	out := make(map[uint64]uint64, len(infos))
	for _, m := range infos {
		maj, min, ok := strings.Cut(m.MajorMinorVer, ":")
		major, err1 := strconv.ParseUint(maj, 10, 32)
		minor, err2 := strconv.ParseUint(min, 10, 32)
		if ok && err1 == nil && err2 == nil && m.MountID >= 0 {
			out[uint64(m.MountID)] = unix.Mkdev(uint32(major), uint32(minor))
		}
	}
	return out
}

// Integrity remembers the content of every file an exec rule granted: its change time and its
// SHA-256 when it was first granted. The kernel denies a granted file once its change time moves
// (it was written in place); compiling grants it again only when its content is still what was
// granted: the digest recorded at its first grant, or the sha256 its rule names. A file replaced
// by a new inode (a package upgrade) is a new file, granted as the first time. It lives as long
// as tetherd: after a restart, what a file holds then is what it is first granted with.
type Integrity struct {
	mu    sync.Mutex
	files map[dataplane.FileID]integrityRecord
	// wanted are the digests of exec rules by content alone: a file an agent tried to execute is
	// learnt (Learn) when its content is one of them.
	wanted map[[sha256.Size]byte]bool
	// jobs are first grants whose digest the worker takes; busy counts those not done.
	jobs chan hashJob
	busy sync.WaitGroup
}

type integrityRecord struct {
	changed int64             // the change time it was last granted at
	digest  [sha256.Size]byte // its content then
	first   [sha256.Size]byte // its content when it was first granted
	// pending: granted the first time, its digest not taken yet (see hash). A file that changes
	// before it is taken has no first content to be granted again with.
	pending bool
}

// hashJob is a first grant's digest to take (see Integrity.hash).
type hashJob struct {
	files   Files
	path    string
	id      dataplane.FileID
	changed int64
}

// NewIntegrity returns an empty record.
func NewIntegrity() *Integrity {
	in := &Integrity{files: map[dataplane.FileID]integrityRecord{}, wanted: map[[sha256.Size]byte]bool{}, jobs: make(chan hashJob, 1024)}
	go in.hash()
	return in
}

// hash takes the digests of first grants, off the compile: a glob of a thousand binaries, or one
// large one, is granted at once, not after it has all been read. The digest counts only if the
// file still has the change time it was granted at once it is read.
func (in *Integrity) hash() {
	for j := range in.jobs {
		st, sum, err := j.files.Digest(j.path)
		in.mu.Lock()
		if rec := in.files[j.id]; rec.pending && rec.changed == j.changed && err == nil && st.ID == j.id && st.Changed == j.changed {
			in.files[j.id] = integrityRecord{changed: j.changed, digest: sum, first: sum}
		}
		in.mu.Unlock()
		in.busy.Done()
	}
}

// Settle waits until the digests of every first grant so far are taken.
func (in *Integrity) Settle() { in.busy.Wait() }

// Want notes a digest an exec rule grants by content alone.
func (in *Integrity) Want(sum [sha256.Size]byte) {
	in.mu.Lock()
	in.wanted[sum] = true
	in.mu.Unlock()
}

// Wants says whether any rule grants by content alone (so that a denied exec is worth a digest).
func (in *Integrity) Wants() bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return len(in.wanted) > 0
}

// Learn takes the digest of the file at path, which must be id (the file the kernel saw), and
// records it when its content is one a rule grants by content alone: then the next compile grants
// it (Matching). It says whether it did.
func (in *Integrity) Learn(files Files, path string, id dataplane.FileID) (bool, error) {
	st, sum, err := files.Digest(path)
	if err != nil {
		return false, err
	}
	if st.ID != id || !st.Regular {
		return false, fmt.Errorf("%s is not the file the kernel saw", path)
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if !in.wanted[sum] {
		return false, nil
	}
	rec, known := in.files[id]
	first := sum
	if known && !rec.pending {
		first = rec.first
	}
	in.files[id] = integrityRecord{changed: st.Changed, digest: sum, first: first}
	return true, nil
}

// Matching are the files known to have content sum, at the change time they had it.
func (in *Integrity) Matching(sum [sha256.Size]byte) []dataplane.ExecRule {
	in.mu.Lock()
	defer in.mu.Unlock()
	var out []dataplane.ExecRule
	for id, rec := range in.files {
		if !rec.pending && rec.digest == sum {
			out = append(out, dataplane.ExecRule{File: id, Changed: rec.changed})
		}
	}
	return out
}

// Check returns the change time at which the file at path (st, as just stat'ed) may be granted,
// or why it may not: its content differs from want (when not nil) or from the digest of its first
// grant.
func (in *Integrity) Check(files Files, path string, st FileStat, want *[sha256.Size]byte) (int64, error) {
	in.mu.Lock()
	rec, known := in.files[st.ID]
	if !known && want == nil {
		// The first grant: its digest is taken in the background (hash).
		in.files[st.ID] = integrityRecord{changed: st.Changed, pending: true}
		in.mu.Unlock()
		in.busy.Add(1)
		in.jobs <- hashJob{files: files, path: path, id: st.ID, changed: st.Changed}
		return st.Changed, nil
	}
	in.mu.Unlock()
	if known && rec.changed == st.Changed && want == nil && (rec.pending || rec.digest == rec.first) {
		return st.Changed, nil
	}
	if known && rec.changed == st.Changed && want != nil && !rec.pending {
		// Its content at this change time is known: no need to read it again.
		if *want != rec.digest {
			return 0, fmt.Errorf("%s has SHA-256 %x, the rule names %x", path, rec.digest, *want)
		}
		return st.Changed, nil
	}
	if known && rec.pending && want == nil {
		return 0, fmt.Errorf("%s changed before its content could be recorded: name its digest in the rule's sha256 to grant it", path)
	}
	now, sum, err := files.Digest(path)
	if err != nil {
		return 0, err
	}
	if now.ID != st.ID {
		return 0, fmt.Errorf("%s was replaced while it was checked", path)
	}
	if want == nil && known && sum != rec.first {
		return 0, fmt.Errorf("%s was modified in place since it was granted (SHA-256 %x, granted %x): name its new digest in the rule's sha256 to grant it", path, sum, rec.first)
	}
	first := sum
	if known && !rec.pending {
		first = rec.first
	}
	// Recorded whether the rule's digest matches or not: the next compile need not read it again.
	in.mu.Lock()
	in.files[st.ID] = integrityRecord{changed: now.Changed, digest: sum, first: first}
	in.mu.Unlock()
	if want != nil && sum != *want {
		return 0, fmt.Errorf("%s has SHA-256 %x, the rule names %x", path, sum, *want)
	}
	return now.Changed, nil
}
