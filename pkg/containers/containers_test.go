package containers

import (
	"bufio"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/dataplane"
)

func TestMain(m *testing.M) { privtest.Main(m) }

// recordingKernel keeps the container roots Roots records (the kernel's map is tested in
// pkg/kernel).
type recordingKernel struct {
	roots map[uint64]dataplane.ContainerRoot
}

func (k *recordingKernel) SetRoot(id uint64, r dataplane.ContainerRoot) error {
	k.roots[id] = r
	return nil
}
func (k *recordingKernel) ForgetRoot(id uint64) error                         { delete(k.roots, id); return nil }
func (k *recordingKernel) Roots() (map[uint64]dataplane.ContainerRoot, error) { return k.roots, nil }

// started runs the test binary's helper in cgroup and waits until it says it is ready.
func started(t *testing.T, cgroup, helper string, args ...string) int {
	t.Helper()
	cmd := privtest.Command(t, cgroup, helper, args...)
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); cmd.Process.Kill(); cmd.Wait() })
	if helper == "chroot" {
		if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || strings.TrimSpace(line) != "ready" {
			t.Fatalf("helper %s %v: %q %v", helper, args, line, err)
		}
	} else {
		go io.Copy(io.Discard, out)
	}
	return cmd.Process.Pid
}

// TestPrivilegedWhichRoot: which process's root a container's exec rules are resolved in, with
// real cgroups and processes. A process chrooted into a mount's root (a container's root file
// system) is trusted and the rules see its files; the attack, an agent process chrooted into a
// directory it filled, is refused (the negative control is the same chroot into a mount's root);
// the runtime on its way into a container (its parent outside the pod, with the same root) is
// recognised, and a process whose root differs from its parent's is not; the pod's first
// container cgroup is its sandbox.
func TestPrivilegedWhichRoot(t *testing.T) {
	privtest.Gate(t)
	pod := privtest.Cgroup(t)
	sandbox, sandboxID := privtest.SubCgroup(t, pod, "sandbox")
	ctr, ctrID := privtest.SubCgroup(t, pod, "ctr")
	chrooted, chrootedID := privtest.SubCgroup(t, pod, "chrooted")
	runtime, _ := privtest.SubCgroup(t, pod, "runtime")

	img := t.TempDir()
	if err := unix.Mount("tmpfs", img, "tmpfs", 0, "mode=0755"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(img, unix.MNT_DETACH) })
	for _, dir := range []string{img, filepath.Join(img, "fake")} {
		os.MkdirAll(filepath.Join(dir, "usr/bin"), 0o755)
		if err := os.WriteFile(filepath.Join(dir, "usr/bin/tether-test-tool"), []byte(dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mount := privtest.Cgroup2(t)
	inImage := started(t, ctr, "chroot", img)
	inFake := started(t, chrooted, "chroot", filepath.Join(img, "fake"))
	inSandbox := started(t, sandbox, "chroot", img)
	onHost := started(t, runtime, "sleep")

	if !runtimePhase(onHost, pod, mount) {
		t.Error("a process with its parent's root, the parent outside the pod: not taken for the runtime")
	}
	if runtimePhase(inImage, pod, mount) {
		t.Error("negative control: a process in a root of its own taken for the runtime")
	}

	k := &recordingKernel{roots: map[uint64]dataplane.ContainerRoot{}}
	r := New(mount, k, nil, nil, slog.New(slog.DiscardHandler))
	if sb, err := r.resolve(1, pod, sandbox, sandboxID, inSandbox); err != nil || !sb {
		t.Errorf("the pod's first container cgroup: sandbox %v, %v", sb, err)
	}
	if sb, err := r.resolve(1, pod, ctr, ctrID, inImage); err != nil || sb {
		t.Fatalf("a container in a mount's root: sandbox %v, %v", sb, err)
	}
	files := r.Files(1)
	if len(files) != 1 {
		t.Fatalf("roots for the rules: %d, want the container's only (the sandbox adds none)", len(files))
	}
	want, err := compile.OS{}.Stat(filepath.Join(img, "usr/bin/tether-test-tool"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := files[0].Stat("/usr/bin/tether-test-tool"); err != nil || got != want {
		t.Errorf("the container's /usr/bin/tether-test-tool: %+v %v, want the image's %+v", got, err, want)
	}
	_, err = r.resolve(1, pod, chrooted, chrootedID, inFake)
	if err == nil || !strings.Contains(err.Error(), "not the root of a mount") {
		t.Errorf("an agent chrooted into a directory it filled: %v, want refused", err)
	}
	if _, ok := k.roots[chrootedID]; ok || len(k.roots) != 2 {
		t.Errorf("recorded roots %v: want the sandbox's and the container's only", k.roots)
	}
}
