package cgroups

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/procfs"
)

// fakeProc makes the package read a proc file system of the test's making: this process's
// mountinfo and cgroup files say what files says (names under /proc/PID).
func fakeProc(t *testing.T, files map[string]string) {
	t.Helper()
	dir := t.TempDir()
	self := filepath.Join(dir, strconv.Itoa(os.Getpid()))
	if err := os.MkdirAll(self, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(strconv.Itoa(os.Getpid()), filepath.Join(dir, "self")); err != nil {
		t.Fatal(err)
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(self, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old := proc
	proc = func() (procfs.FS, error) { return procfs.NewFS(dir) }
	t.Cleanup(func() { proc = old })
}

// TestMount: the cgroup2 mount is found through procfs, mountinfo's escapes undone; a table
// without one, or one procfs cannot parse, is an error that says so.
func TestMount(t *testing.T) {
	tests := []struct {
		name, in, want, err string
	}{
		{"hybrid", `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`, "/sys/fs/cgroup/unified", ""},
		{"unified with optional fields", "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n", "/sys/fs/cgroup", ""},
		{"escaped space", `41 31 0:38 / /mnt/my\040cgroups rw - cgroup2 none rw` + "\n", "/mnt/my cgroups", ""},
		{"none", "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n", "", "no cgroup2 hierarchy"},
		{"malformed", "41 31 - cgroup2 cgroup2 rw\n", "", "mountinfo"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fakeProc(t, map[string]string{"mountinfo": tt.in})
			got, err := Mount()
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("error %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %q %v, want %q", got, err, tt.want)
			}
		})
	}
}

func TestMountPoints(t *testing.T) {
	fakeProc(t, map[string]string{"mountinfo": "22 1 0:21 / /sys/fs/bpf rw,relatime shared:7 - bpf bpf rw\n" +
		"30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw\n" +
		"31 25 0:27 / /mnt/with\\040space rw - tmpfs tmpfs rw\n"})
	got, err := MountPoints()
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, m := range got {
		paths = append(paths, m.Path+" "+m.FSType)
	}
	if want := []string{"/sys/fs/bpf bpf", "/sys/fs/cgroup/unified cgroup2", "/mnt/with space tmpfs"}; !slices.Equal(paths, want) {
		t.Errorf("%q, want %q", paths, want)
	}
}

// TestProcCgroup: the cgroup2 line is the path; the v1 hierarchy of a controller is found by the
// super options of its mount and this process's line for it.
func TestProcCgroup(t *testing.T) {
	fakeProc(t, map[string]string{
		"cgroup":    "12:pids:/user.slice\n4:cpu,cpuacct:/tether-test\n0::/tether/agent-1\n",
		"mountinfo": "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
	})
	if got, err := PathOf(os.Getpid()); err != nil || got != "/tether/agent-1" {
		t.Errorf("PathOf: %q %v", got, err)
	}
	if mnt, own, err := V1Hierarchy("cpu"); err != nil || mnt != "/sys/fs/cgroup/cpu,cpuacct" || own != "/tether-test" {
		t.Errorf("V1Hierarchy(cpu): %q %q %v", mnt, own, err)
	}
	if mnt, own, err := V1Hierarchy("pids"); err != nil || mnt != "" || own != "" {
		t.Errorf("V1Hierarchy(pids), no such mount: %q %q %v", mnt, own, err)
	}
	fakeProc(t, map[string]string{"cgroup": "12:pids:/x\n"})
	if _, err := PathOf(os.Getpid()); err == nil {
		t.Error("no 0:: line accepted")
	}
}

func TestLevel(t *testing.T) {
	for path, want := range map[string]int{"/cg": 0, "/cg/a": 1, "/cg/a/b/c": 3} {
		if got, err := Level("/cg", path); err != nil || got != want {
			t.Errorf("Level(%s) = %d %v, want %d", path, got, err, want)
		}
	}
	if _, err := Level("/cg", "/other"); err == nil {
		t.Error("a path outside the mount has a level")
	}
}

// TestV1Hierarchy: on a host with a cgroup v1 cpu hierarchy, it is found with this process's
// cgroup in it; a controller no v1 hierarchy holds is not.
func TestV1Hierarchy(t *testing.T) {
	mnt, own, err := V1Hierarchy("no-such-controller")
	if err != nil || mnt != "" || own != "" {
		t.Errorf("a controller nowhere: %q %q %v", mnt, own, err)
	}
	mnt, own, err = V1Hierarchy("cpu")
	if err != nil {
		t.Fatal(err)
	}
	if mnt == "" {
		t.Skip("no cgroup v1 cpu hierarchy on this host")
	}
	if _, err := os.Stat(filepath.Join(mnt, own, "cpu.shares")); err != nil {
		t.Errorf("v1 cpu hierarchy %s, own cgroup %s: %v", mnt, own, err)
	}
}
