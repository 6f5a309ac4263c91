// Package privtest is the shared gate and fixtures of tether's privileged tests: real cgroups,
// network namespaces with veth pairs, bpffs pin directories, and helper processes (the test binary
// re-executed) started directly inside a cgroup. Every fixture removes what it created.
package privtest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/bpffs"
	"github.com/tether-sh/tether/pkg/cgroups"
)

// RequireEnv makes a privileged test fail instead of skipping when set to 1 (CI sets it).
const RequireEnv = "TETHER_REQUIRE_PRIVILEGED"

// Gate skips a privileged test with the reason when this process cannot load BPF programs, and
// fails it instead when TETHER_REQUIRE_PRIVILEGED=1.
func Gate(t testing.TB) {
	t.Helper()
	reason := ""
	if testing.Short() {
		reason = "needs root and BPF: skipped in -short mode"
	} else if os.Geteuid() != 0 {
		reason = "needs root and BPF: not running as root (run `sudo make test`)"
	} else if err := probeBPF(); err != nil {
		reason = fmt.Sprintf("needs root and BPF: %v", err)
	}
	if reason == "" {
		return
	}
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("%s (%s=1 forbids skipping)", reason, RequireEnv)
	}
	t.Skip(reason)
}

// probeBPF creates (and closes) a one-entry BPF array: the least a privileged test needs.
func probeBPF() error {
	attr := struct{ mapType, keySize, valueSize, maxEntries uint32 }{2 /* BPF_MAP_TYPE_ARRAY */, 4, 4, 1}
	fd, _, errno := unix.Syscall(unix.SYS_BPF, 0 /* BPF_MAP_CREATE */, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	if errno != 0 {
		return fmt.Errorf("bpf(BPF_MAP_CREATE): %w", errno)
	}
	return unix.Close(int(fd))
}

// Name returns "tether-test-" and a random suffix.
func Name() string {
	var b [4]byte
	rand.Read(b[:])
	return "tether-test-" + hex.EncodeToString(b[:])
}

// Cgroup2 returns the cgroup2 mount point.
func Cgroup2(t testing.TB) string {
	t.Helper()
	root, err := cgroups.Mount()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// Cgroup creates a tether-test-* cgroup directly under the cgroup2 root and removes it (killing
// whatever still runs in it, which can only be what the test started) when the test ends.
func Cgroup(t testing.TB) string {
	t.Helper()
	path := filepath.Join(Cgroup2(t), Name())
	if _, err := cgroups.Create(path); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cgroups.Remove(path, 10*time.Second); err != nil {
			t.Errorf("removing test cgroup: %v", err)
		}
	})
	return path
}

// SubCgroup creates a child cgroup of parent; the parent's cleanup removes it.
func SubCgroup(t testing.TB, parent, name string) (string, uint64) {
	t.Helper()
	path := filepath.Join(parent, name)
	id, err := cgroups.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	return path, id
}

// PinDir returns a fresh directory on bpffs for the test's pins and removes every pin in it
// (detaching what the test attached) when the test ends.
func PinDir(t testing.TB) string {
	t.Helper()
	dir := filepath.Join("/sys/fs/bpf", Name())
	if err := bpffs.Ensure(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := bpffs.RemovePins(dir); err != nil {
			t.Errorf("removing test pins: %v", err)
		}
	})
	return dir
}
