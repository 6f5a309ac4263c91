package compile

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// Files resolves paths to the files the kernel will see.
type Files interface {
	// Stat follows symlinks and returns the file's identity and whether it is a regular file.
	Stat(path string) (dataplane.FileID, bool, error)
	// Glob expands a pattern (filepath.Match syntax).
	Glob(pattern string) ([]string, error)
	// WorldWritable reports whether the file or directory is writable by every user.
	WorldWritable(path string) bool
}

// OS resolves paths on this host.
type OS struct{}

// Stat identifies a file the way the exec hook sees it: its inode and the device of its
// superblock (super_block.s_dev), which mountinfo lists for the file's mount. stat's st_dev is
// not always that: on btrfs it is the subvolume's own anonymous device.
func (OS) Stat(path string) (dataplane.FileID, bool, error) {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, 0, unix.STATX_TYPE|unix.STATX_INO|unix.STATX_MNT_ID, &stx); err != nil {
		return dataplane.FileID{}, false, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	id := dataplane.FileID{Dev: unix.Mkdev(stx.Dev_major, stx.Dev_minor), Ino: stx.Ino}
	if stx.Mask&unix.STATX_MNT_ID != 0 {
		if dev, ok := mounts.device(stx.Mnt_id); ok {
			id.Dev = dev
		}
	}
	return id, stx.Mode&unix.S_IFMT == unix.S_IFREG, nil
}

func (OS) Glob(pattern string) ([]string, error) { return filepath.Glob(pattern) }

func (OS) WorldWritable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().Perm()&0o002 != 0
}

// mountDevices maps mount ids to their superblock's device, from /proc/self/mountinfo; it is
// read again when an id is not known.
type mountDevices struct {
	mu   sync.Mutex
	devs map[uint64]uint64
}

var mounts mountDevices

func (m *mountDevices) device(mntID uint64) (uint64, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if dev, ok := m.devs[mntID]; ok {
		return dev, true
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return 0, false
	}
	m.devs = parseMountDevices(string(b))
	dev, ok := m.devs[mntID]
	return dev, ok
}

// parseMountDevices reads "ID PARENT MAJOR:MINOR ..." lines.
func parseMountDevices(mountinfo string) map[uint64]uint64 {
	out := map[uint64]uint64{}
	for _, line := range strings.Split(mountinfo, "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		id, err1 := strconv.ParseUint(f[0], 10, 64)
		maj, min, ok := strings.Cut(f[2], ":")
		major, err2 := strconv.ParseUint(maj, 10, 32)
		minor, err3 := strconv.ParseUint(min, 10, 32)
		if err1 == nil && err2 == nil && err3 == nil && ok {
			out[id] = unix.Mkdev(uint32(major), uint32(minor))
		}
	}
	return out
}
