package cgroups

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestParseMountInfo(t *testing.T) {
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
		{"malformed", "41 31 - cgroup2 cgroup2 rw\n", "", "malformed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseMountInfo(strings.NewReader(tt.in))
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

func TestParseMountPoints(t *testing.T) {
	in := "22 1 0:21 / /sys/fs/bpf rw,relatime shared:7 - bpf bpf rw\n" +
		"30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw\n" +
		"31 25 0:27 / /mnt/with\\040space rw - tmpfs tmpfs rw\n" +
		"garbage\n"
	got, err := parseMountPoints(strings.NewReader(in))
	want := []MountPoint{{"/sys/fs/bpf", "bpf"}, {"/sys/fs/cgroup/unified", "cgroup2"}, {"/mnt/with space", "tmpfs"}}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("%v %v, want %v", got, err, want)
	}
}

func TestParseProcCgroup(t *testing.T) {
	got, err := parseProcCgroup([]byte("12:pids:/user.slice\n0::/tether/agent-1\n"))
	if err != nil || got != "/tether/agent-1" {
		t.Errorf("got %q %v", got, err)
	}
	if _, err := parseProcCgroup([]byte("12:pids:/x\n")); err == nil {
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
