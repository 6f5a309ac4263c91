// Package cgroups finds the cgroup2 hierarchy and creates, inspects and removes the cgroups that
// tether owns. Agents are cgroup subtrees; this package knows nothing about agents, it hands cgroup
// paths and ids to the stages that bind them.
package cgroups

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"
)

// proc is the proc file system at /proc, read through prometheus/procfs. Tests read one of their
// own making instead.
var proc = func() (procfs.FS, error) { return procfs.NewDefaultFS() }

// Mount returns the mount point of the cgroup2 hierarchy, read from /proc/self/mountinfo. On a
// hybrid host it is where the unified hierarchy is mounted (often /sys/fs/cgroup/unified).
func Mount() (string, error) {
	mounts, err := MountPoints()
	if err != nil {
		return "", err
	}
	for _, m := range mounts {
		if m.FSType == "cgroup2" {
			return m.Path, nil
		}
	}
	return "", errors.New("no cgroup2 hierarchy is mounted (tether needs cgroup v2; mount it with `mount -t cgroup2 none /sys/fs/cgroup`)")
}

// A MountPoint is one line of /proc/self/mountinfo: where, the file system type, and the super
// block's options.
type MountPoint struct {
	Path, FSType string
	SuperOptions map[string]string
}

// MountPoints lists the calling process's mounts in mountinfo's order (a mount after the one it
// is mounted on).
func MountPoints() ([]MountPoint, error) {
	fs, err := proc()
	if err != nil {
		return nil, err
	}
	infos, err := fs.GetMounts()
	if err != nil {
		return nil, fmt.Errorf("reading this process's mountinfo: %w", err)
	}
	out := make([]MountPoint, 0, len(infos))
	for _, m := range infos {
		// procfs keeps mountinfo's octal escapes (\040 for a space) in the path.
		out = append(out, MountPoint{Path: unescapeMountPath(m.MountPoint), FSType: m.FSType, SuperOptions: m.SuperOptions})
	}
	return out, nil
}

// V1Hierarchy finds the cgroup v1 hierarchy that holds controller (a hybrid layout keeps cpu
// there): its mount point, and the calling process's cgroup in it. Both are "" when no v1
// hierarchy holds it.
func V1Hierarchy(controller string) (mount, own string, err error) {
	mounts, err := MountPoints()
	if err != nil {
		return "", "", err
	}
	i := slices.IndexFunc(mounts, func(m MountPoint) bool {
		_, holds := m.SuperOptions[controller]
		return m.FSType == "cgroup" && holds
	})
	if i < 0 {
		return "", "", nil
	}
	mount = mounts[i].Path
	cgs, err := cgroupsOf(0)
	if err != nil {
		return "", "", err
	}
	for _, cg := range cgs {
		if slices.Contains(cg.Controllers, controller) {
			return mount, cg.Path, nil
		}
	}
	return "", "", fmt.Errorf("this process is in no cgroup of the v1 %s hierarchy at %s", controller, mount)
}

// cgroupsOf lists the cgroups of process pid (0: this process), one per hierarchy.
func cgroupsOf(pid int) ([]procfs.Cgroup, error) {
	fs, err := proc()
	if err != nil {
		return nil, err
	}
	if pid == 0 {
		pid = os.Getpid()
	}
	p, err := fs.Proc(pid)
	if err != nil {
		return nil, err
	}
	return p.Cgroups()
}

// v2Path is the cgroup2 line's path among cgs.
func v2Path(cgs []procfs.Cgroup) (string, error) {
	for _, cg := range cgs {
		if cg.HierarchyID == 0 {
			return cg.Path, nil
		}
	}
	return "", errors.New("process is in no cgroup2 cgroup")
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space, ...).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// ID returns the id of the cgroup2 directory at path (its inode number, which is what
// bpf_get_current_cgroup_id reports).
func ID(path string) (uint64, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("%s is not in a cgroup2 hierarchy", path)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}

// Level is the depth of path below the hierarchy's root mount (the root is level 0).
func Level(mount, path string) (int, error) {
	rel, err := filepath.Rel(mount, path)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return 0, fmt.Errorf("%s is not below the cgroup2 mount %s", path, mount)
	}
	if rel == "." {
		return 0, nil
	}
	return strings.Count(rel, "/") + 1, nil
}

// Create makes the cgroup directory (and missing parents) and returns its id. An existing
// directory is not an error.
func Create(path string) (uint64, error) {
	if err := os.MkdirAll(path, 0o755); err != nil {
		return 0, fmt.Errorf("creating cgroup: %w", err)
	}
	return ID(path)
}

// SetMaxDepth limits how deep cgroups may be nested below path (cgroup.max.depth).
func SetMaxDepth(path string, n int) error {
	return os.WriteFile(filepath.Join(path, "cgroup.max.depth"), []byte(strconv.Itoa(n)), 0)
}

// MaxDepth reads cgroup.max.depth; ok is false when it is unlimited ("max").
func MaxDepth(path string) (n int, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(path, "cgroup.max.depth"))
	if err != nil {
		return 0, false, err
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return 0, false, nil
	}
	n, err = strconv.Atoi(s)
	return n, err == nil, err
}

// Populated reports whether any process lives in the cgroup or below it.
func Populated(path string) (bool, error) {
	b, err := os.ReadFile(filepath.Join(path, "cgroup.events"))
	if err != nil {
		return false, err
	}
	for _, line := range bytes.Split(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("populated ")); ok {
			return string(v) == "1", nil
		}
	}
	return false, fmt.Errorf("%s/cgroup.events has no populated field", path)
}

// Kill kills every process in the cgroup and below it (cgroup.kill, or SIGKILL to each listed
// process on kernels before 5.14). Only call it on a cgroup tether created.
func Kill(path string) error {
	err := os.WriteFile(filepath.Join(path, "cgroup.kill"), []byte("1"), 0)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		for _, pid := range Procs(p) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		return nil
	})
}

// Procs lists the processes directly in the cgroup.
func Procs(path string) []int {
	b, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// WaitEmpty waits until no process lives in the cgroup or below it. A cgroup that is removed
// meanwhile is empty.
func WaitEmpty(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		populated, err := Populated(path)
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENODEV) {
			return nil // removed (ENODEV: while its file was being read)
		}
		if err != nil {
			return err
		}
		if !populated {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s still has processes after %s", path, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Remove kills what still runs in the cgroup, waits for it to be empty and removes it with its
// child cgroups. A cgroup that is already gone is not an error. Only call it on a cgroup tether
// created.
func Remove(path string, timeout time.Duration) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if populated, err := Populated(path); err != nil {
		return err
	} else if populated {
		if err := Kill(path); err != nil {
			return fmt.Errorf("killing processes of %s: %w", path, err)
		}
		if err := WaitEmpty(path, timeout); err != nil {
			return err
		}
	}
	var dirs []string
	err := filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := unix.Rmdir(dirs[i]); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("removing cgroup %s: %w", dirs[i], err)
		}
	}
	return nil
}

// PathOf returns the cgroup2 path of process pid, relative to the hierarchy's root.
func PathOf(pid int) (string, error) {
	cgs, err := cgroupsOf(pid)
	if err != nil {
		return "", err
	}
	return v2Path(cgs)
}

// CheckNamespace reports whether /proc/self/cgroup names this process's cgroup from the root of
// the cgroup2 mount at root, as it does in the host's cgroup namespace: in a namespace of its
// own, it names the namespace's root ("/"), whose cgroup.procs does not list this process.
func CheckNamespace(root string) error {
	cgs, err := cgroupsOf(0)
	if err != nil {
		return err
	}
	rel, err := v2Path(cgs)
	if err != nil {
		return errors.New("/proc/self/cgroup has no cgroup2 line")
	}
	procs, err := os.ReadFile(filepath.Join(root, rel, "cgroup.procs"))
	if err == nil && slices.Contains(strings.Fields(string(procs)), strconv.Itoa(os.Getpid())) {
		return nil
	}
	return fmt.Errorf("/proc/self/cgroup says %s, but %s does not hold this process: tetherd is in a cgroup namespace of its own", rel, filepath.Join(root, rel))
}
