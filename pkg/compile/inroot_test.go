package compile

import (
	"bufio"
	"cmp"
	"context"
	"crypto/sha256"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/grants"
)

var _ Files = (*InRoot)(nil)

// rootTree makes a root file system in a directory: a tool in /usr/lib, reached by an absolute
// link from /usr/bin and through a relative /bin -> usr/bin, and links that try to leave the root.
func rootTree(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"usr/lib/tool", "usr/bin", "etc", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "usr/lib/tool/tether-test-tool"), []byte("in root"), 0o755); err != nil {
		t.Fatal(err)
	}
	for link, target := range map[string]string{
		"usr/bin/tether-test-tool": "/usr/lib/tool/tether-test-tool",
		"bin":                      "usr/bin",
		"escape":                   "/etc/passwd",
		"dotdot":                   "../../../../../../../../etc/passwd",
	} {
		if err := os.Symlink(target, filepath.Join(root, link)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(filepath.Join(root, "tmp"), 0o777); err != nil {
		t.Fatal(err)
	}
	return root
}

// TestInRootResolvesInsideTheRoot: an absolute link inside the root leads to the root's file,
// where the same path opened through the root directory leads to the host's (the negative
// control: OS); links that point out of the root stay in it; Digest, Glob and WorldWritable
// read the root's files.
func TestInRootResolvesInsideTheRoot(t *testing.T) {
	root := rootTree(t)
	in := &InRoot{Root: root, MountsOf: 0}
	want, err := OS{}.Stat(filepath.Join(root, "usr/lib/tool/tether-test-tool"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"/usr/bin/tether-test-tool", "/bin/tether-test-tool", "usr/lib/../bin/tether-test-tool"} {
		got, err := in.Stat(name)
		if err != nil || got != want {
			t.Errorf("Stat(%q) = %+v, %v; want the root's tool %+v", name, got, err, want)
		}
	}
	if _, err := (OS{}).Stat(filepath.Join(root, "usr/bin/tether-test-tool")); err == nil {
		t.Error("negative control: the link opened through the directory found a file: it should lead to the host's /usr/lib/tool, which has none")
	}
	if _, err := (OS{}).Stat("/etc/passwd"); err != nil {
		t.Fatalf("the host has no /etc/passwd to escape to: %v", err)
	}
	for _, name := range []string{"/escape", "/dotdot", "/../../etc/passwd"} {
		if st, err := in.Stat(name); err == nil {
			t.Errorf("Stat(%q) left the root: %+v", name, st)
		}
	}
	st, sum, err := in.Digest("/bin/tether-test-tool")
	if err != nil || st != want || sum != sha256.Sum256([]byte("in root")) {
		t.Errorf("Digest: %+v %x %v", st, sum, err)
	}
	if got, err := in.Glob("/usr/*/tether-test-*"); err != nil || !slices.Equal(got, []string{"/usr/bin/tether-test-tool"}) {
		t.Errorf("Glob(/usr/*/tether-test-*) = %q, %v", got, err)
	}
	if got, err := in.Glob("/b?n/tether-test-tool"); err != nil || !slices.Equal(got, []string{"/bin/tether-test-tool"}) {
		t.Errorf("Glob(/b?n/tether-test-tool) = %q, %v", got, err)
	}
	if !in.WorldWritable("/tmp") || in.WorldWritable("/usr/bin") {
		t.Error("WorldWritable: want /tmp only")
	}
	if _, err := (&InRoot{Root: filepath.Join(root, "none")}).Stat("/bin/tether-test-tool"); err == nil {
		t.Error("a root that does not exist resolved a file")
	}
}

// TestPrivilegedInRootOfAnotherMountNamespace: a process in its own mount namespace has a tmpfs
// over a directory that is empty on the host; through the process's root, its file is found,
// with the tmpfs's device from the process's mount table; the host's view has no such file.
func TestPrivilegedInRootOfAnotherMountNamespace(t *testing.T) {
	privtest.Gate(t)
	dir := t.TempDir()
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount -t tmpfs tether-test "$1" && printf x > "$1/f" && echo ready && exec sleep 60`, "sh", dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("the namespaced process: %q %v", line, err)
	}
	name := filepath.Join(dir, "f")
	if _, err := (OS{}).Stat(name); err == nil {
		t.Fatal("the host sees the other namespace's file")
	}
	in := NewInRoot(cmd.Process.Pid)
	got, err := in.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	// tmpfs has no device of its own: stat's st_dev is its superblock's.
	fi, err := os.Stat(filepath.Join(in.Root, name))
	if err != nil {
		t.Fatal(err)
	}
	if dev := fi.Sys().(*syscall.Stat_t).Dev; got.ID.Dev != dev || !got.Regular {
		t.Errorf("Stat in the process's root: %+v, want the tmpfs's device %d", got, dev)
	} else if !slices.Contains(slices.Collect(maps.Values(in.mounts.devs)), dev) {
		t.Errorf("the tmpfs's device %d was not found in this process's mount table", dev)
	}
}

// TestExecInRoots: with ExecRoots, an exec rule names the file at its path in each root (a pod's
// containers), the union is granted, and a rule is refused only when no root has its file. The
// host's files (Files) are not looked at: the negative control compiles the same grants on the
// host, where none of the paths exists.
func TestExecInRoots(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	for root, name := range map[string]string{a: "tether-test-a", b: "tether-test-b"} {
		if err := os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "usr/bin", name), []byte(name), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	g := grants.Grants{Exec: []grants.Exec{{Path: "/usr/bin/tether-test-a"}, {Path: "/usr/bin/tether-test-b"}, {Path: "/usr/bin/tether-test-c"}}}
	host := Compile(context.Background(), g, Options{Files: OS{}})
	if len(host.RuleSet.Exec) != 0 || len(host.Refused) != 3 {
		t.Fatalf("negative control on the host: %d rules, refused %v", len(host.RuleSet.Exec), host.Refused)
	}
	roots := []Files{&InRoot{Root: a, MountsOf: 0}, &InRoot{Root: b, MountsOf: 0}}
	res := Compile(context.Background(), g, Options{Files: OS{}, ExecRoots: roots})
	var want []dataplane.FileID
	for _, p := range []string{filepath.Join(a, "usr/bin/tether-test-a"), filepath.Join(b, "usr/bin/tether-test-b")} {
		st, err := OS{}.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, st.ID)
	}
	var got []dataplane.FileID
	for _, r := range res.RuleSet.Exec {
		got = append(got, r.File)
	}
	slices.SortFunc(want, func(x, y dataplane.FileID) int { return cmp.Compare(x.Ino, y.Ino) })
	slices.SortFunc(got, func(x, y dataplane.FileID) int { return cmp.Compare(x.Ino, y.Ino) })
	if !slices.Equal(got, want) {
		t.Errorf("granted %v, want the two roots' files %v", got, want)
	}
	if len(res.Refused) != 1 || !strings.HasPrefix(res.Refused[0].Rule, "exec[2]") {
		t.Errorf("refused %v, want exec[2] only (no root has it)", res.Refused)
	}
	if none := Compile(context.Background(), g, Options{Files: OS{}, ExecRoots: []Files{}}); len(none.RuleSet.Exec) != 0 || len(none.Refused) != 0 {
		t.Errorf("no container resolved yet: %d rules, refused %v; want none of either", len(none.RuleSet.Exec), none.Refused)
	}
}
