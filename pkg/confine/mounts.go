package confine

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/cgroups"
)

// mounts sets up the agent's view of the file system. The process is alone in a new mount
// namespace and the first process of a new PID namespace.
func mounts(plan Plan) error {
	// Nothing done here reaches the host's mounts, and nothing mounted on the host later shows
	// up here.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making the agent's mounts private: %w", err)
	}
	// A /proc of the agent's PID namespace: no other process of the host is there to read,
	// signal or take descriptors from.
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mounting the agent's /proc: %w", err)
	}
	list, err := cgroups.MountPoints()
	if err != nil {
		return err
	}
	// bpffs (tether's pins, and anyone else's) is not there for the agent: deepest first.
	for i := len(list) - 1; i >= 0; i-- {
		if list[i].FSType == "bpf" {
			if err := unix.Unmount(list[i].Path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("unmounting bpffs at %s: %w", list[i].Path, err)
			}
		}
	}
	// The cgroup trees are read-only: no leaving the agent's cgroup, no deeper nesting, no
	// raising a limit.
	for _, m := range list {
		if m.FSType == "cgroup2" || m.FSType == "cgroup" {
			if err := readOnly(m.Path, false); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("making the cgroup tree at %s read-only: %w", m.Path, err)
			}
		}
	}
	if plan.Credentials != "" {
		if err := ownCredentials(plan.CredentialDir, plan.Credentials); err != nil {
			return err
		}
	}
	for _, p := range plan.Hide {
		if err := hide(p); err != nil {
			return err
		}
	}
	for _, p := range plan.ReadOnly {
		if err := readOnly(p, true); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("making %s read-only: %w", p, err)
		}
	}
	return nil
}

// readOnly remounts what is mounted at p read-only, keeping its other flags; with bind, p is
// first bind-mounted over itself (a file or directory that is no mount point).
func readOnly(p string, bind bool) error {
	if bind {
		if err := unix.Mount(p, p, "", unix.MS_BIND, ""); err != nil {
			return err
		}
	}
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		return err
	}
	// A bind remount must keep the locked flags of the mount (nosuid, nodev, noexec, atime).
	flags := uintptr(unix.MS_REMOUNT | unix.MS_BIND | unix.MS_RDONLY)
	for _, f := range [][2]uintptr{{unix.ST_NOSUID, unix.MS_NOSUID}, {unix.ST_NODEV, unix.MS_NODEV}, {unix.ST_NOEXEC, unix.MS_NOEXEC},
		{unix.ST_NOATIME, unix.MS_NOATIME}, {unix.ST_NODIRATIME, unix.MS_NODIRATIME}, {unix.ST_RELATIME, unix.MS_RELATIME}} {
		if uintptr(st.Flags)&f[0] != 0 {
			flags |= f[1]
		}
	}
	return unix.Mount("", p, "", flags, "")
}

// hide mounts an empty read-only tmpfs over directory p, or /dev/null over anything else (a
// socket, a key file); a path that is not there is left alone.
func hide(p string) error {
	fi, err := os.Lstat(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("hiding %s: %w", p, err)
	}
	if fi.IsDir() {
		if err := unix.Mount("tether-hidden", p, "tmpfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "size=4k,mode=0555"); err != nil {
			return fmt.Errorf("hiding %s: %w", p, err)
		}
		return nil
	}
	if err := unix.Mount("/dev/null", p, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("hiding %s: %w", p, err)
	}
	if err := readOnly(p, false); err != nil {
		return fmt.Errorf("hiding %s: %w", p, err)
	}
	return nil
}

// ownCredentials leaves the agent only its own credential directory of dir: an empty read-only
// tmpfs covers dir, with own bound back into it. Where own is not there (tetherd keeps its
// credentials in a mount namespace of its own), nothing is done.
func ownCredentials(dir, own string) error {
	fd, err := unix.Open(own, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("opening the agent's credential directory: %w", err)
	}
	defer unix.Close(fd)
	const flags = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	if err := unix.Mount("tether-credentials", dir, "tmpfs", flags, "size=4k,mode=0711"); err != nil {
		return fmt.Errorf("covering the credential directory: %w", err)
	}
	target := filepath.Join(dir, filepath.Base(own))
	if err := os.Mkdir(target, 0o500); err != nil {
		return fmt.Errorf("covering the credential directory: %w", err)
	}
	if err := unix.Mount("/proc/self/fd/"+strconv.Itoa(fd), target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("binding the agent's credential directory: %w", err)
	}
	if err := unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_RDONLY|flags, "size=4k,mode=0711"); err != nil {
		return fmt.Errorf("covering the credential directory: %w", err)
	}
	return nil
}
