// Package bpffs prepares and cleans the bpf filesystem directory where tether pins its maps and
// links. It does not load anything; pkg/kernel does.
package bpffs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// RemovePins detaches everything tether attached and removes its pins: enforcement stops. For
// uninstalling, not for restarts.
func RemovePins(pinDir string) error {
	entries, err := os.ReadDir(filepath.Join(pinDir, "links"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	var errs []error
	for _, e := range entries {
		errs = append(errs, os.Remove(filepath.Join(pinDir, "links", e.Name())))
	}
	errs = append(errs, os.Remove(filepath.Join(pinDir, "links")))
	entries, err = os.ReadDir(pinDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, e := range entries {
		errs = append(errs, os.Remove(filepath.Join(pinDir, e.Name())))
	}
	if err := os.Remove(pinDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	var out []error
	for _, e := range errs {
		if e != nil && !errors.Is(e, os.ErrNotExist) {
			out = append(out, e)
		}
	}
	return errors.Join(out...)
}

// Ensure makes sure dir can hold pins: it is on a bpf filesystem, mounting one at
// /sys/fs/bpf when dir is below it and nothing is mounted there.
func Ensure(dir string) error {
	dir = filepath.Clean(dir)
	existing := dir
	for {
		if _, err := os.Stat(existing); err == nil {
			break
		}
		parent := filepath.Dir(existing)
		if parent == existing {
			break
		}
		existing = parent
	}
	var st unix.Statfs_t
	if err := unix.Statfs(existing, &st); err != nil {
		return fmt.Errorf("checking %s: %w", existing, err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		const bpffs = "/sys/fs/bpf"
		if dir != bpffs && !strings.HasPrefix(dir, bpffs+"/") {
			return fmt.Errorf("pin directory %s is not on a bpf filesystem; mount one (mount -t bpf bpf DIR) or pin under %s", dir, bpffs)
		}
		if err := unix.Mount("bpf", bpffs, "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("mounting bpffs at %s: %w", bpffs, err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	return nil
}
