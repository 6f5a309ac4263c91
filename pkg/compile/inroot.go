package compile

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// InRoot resolves paths inside another root file system, as a process that has it as its root
// sees them: a container's, through /proc/PID/root of one of its processes. Absolute symbolic
// links and ".." stay inside the root (openat2 RESOLVE_IN_ROOT), so "/usr/bin/git" is the
// container's git even when it is a link to "/usr/lib/git-core/git"; going through
// /proc/PID/root with a plain open would follow such a link on tetherd's own root. Files are
// identified by the device of their mount's superblock, from the mount table of process MountsOf
// (its /proc/PID/mountinfo: its mounts are not tetherd's).
type InRoot struct {
	Root     string // the root directory: /proc/PID/root
	MountsOf int    // a process in that root's mount namespace (0: tetherd, in its own)

	mounts mountDevices
}

// NewInRoot resolves paths in the root of process pid.
func NewInRoot(pid int) *InRoot {
	return &InRoot{Root: fmt.Sprintf("/proc/%d/root", pid), MountsOf: pid}
}

// openInRoot opens name (absolute, as seen inside the root) with flags, resolving it inside the
// root. A rename or mount racing the lookup makes the kernel refuse it (EAGAIN): tried again.
func (r *InRoot) openInRoot(name string, flags uint64) (int, error) {
	root, err := unix.Open(r.Root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open root", Path: r.Root, Err: err}
	}
	defer unix.Close(root)
	how := unix.OpenHow{Flags: flags | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS}
	for range 16 {
		fd, err := unix.Openat2(root, name, &how)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return -1, &os.PathError{Op: "open", Path: name + " in " + r.Root, Err: err}
		}
		return fd, nil
	}
	return -1, &os.PathError{Op: "open", Path: name + " in " + r.Root, Err: unix.EAGAIN}
}

// stat identifies the open file fd by its mount's device (the table of MountsOf) and inode.
func (r *InRoot) stat(fd int) (FileStat, error) {
	st, err := statxRaw(fd, "", unix.AT_EMPTY_PATH)
	if err != nil {
		return FileStat{}, err
	}
	if st.mntID != 0 {
		if dev, ok := r.mounts.deviceIn(r.MountsOf, st.mntID); ok {
			st.FileStat.ID.Dev = dev
		}
	}
	return st.FileStat, nil
}

// Stat identifies the file name leads to inside the root, the way the exec hook sees it.
func (r *InRoot) Stat(name string) (FileStat, error) {
	fd, err := r.openInRoot(name, unix.O_PATH)
	if err != nil {
		return FileStat{}, err
	}
	defer unix.Close(fd)
	return r.stat(fd)
}

// Digest is the SHA-256 of the file's content, with the identity it had while it was read.
func (r *InRoot) Digest(name string) (FileStat, [sha256.Size]byte, error) {
	fd, err := r.openInRoot(name, unix.O_RDONLY)
	if err != nil {
		return FileStat{}, [sha256.Size]byte{}, err
	}
	f := os.NewFile(uintptr(fd), name+" in "+r.Root)
	defer f.Close()
	return digest(f, r.stat)
}

// Glob expands pattern (filepath.Match syntax) inside the root, directory by directory, each
// listed through a descriptor resolved inside the root. The names are as seen inside the root.
func (r *InRoot) Glob(pattern string) ([]string, error) {
	pattern = path.Clean("/" + pattern)
	if _, err := path.Match(pattern, ""); err != nil {
		return nil, err
	}
	found := []string{"/"}
	for _, part := range strings.Split(strings.TrimPrefix(pattern, "/"), "/") {
		var next []string
		for _, dir := range found {
			if !hasMeta(part) {
				if _, err := r.Stat(path.Join(dir, part)); err == nil {
					next = append(next, path.Join(dir, part))
				}
				continue
			}
			for _, n := range r.list(dir) {
				if ok, _ := path.Match(part, n); ok {
					next = append(next, path.Join(dir, n))
				}
			}
		}
		found = next
	}
	sort.Strings(found)
	return found, nil
}

func hasMeta(s string) bool { return strings.ContainsAny(s, `*?[\`) }

// list is the names in directory dir inside the root (none when it cannot be read).
func (r *InRoot) list(dir string) []string {
	fd, err := r.openInRoot(dir, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil
	}
	f := os.NewFile(uintptr(fd), dir)
	defer f.Close()
	names, _ := f.Readdirnames(-1)
	return names
}

// Resolve is name cleaned: a unix socket path is matched as the agent passes it, inside its own
// mount namespace.
func (r *InRoot) Resolve(name string) string { return filepath.Clean(name) }

// WorldWritable reports whether the file or directory name leads to inside the root is writable
// by every user.
func (r *InRoot) WorldWritable(name string) bool {
	fd, err := r.openInRoot(name, unix.O_PATH)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	return unix.Fstat(fd, &st) == nil && st.Mode&0o002 != 0
}
