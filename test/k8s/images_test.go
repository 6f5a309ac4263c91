package k8s

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// The images make test-k8s builds and imports (no registry: pods use imagePullPolicy Never).
const (
	pauseImage  = "tether.test/pause:1"
	agentImage  = "tether.test/agent:1"
	tetherImage = "tether.test/tether:1"
)

// imageFile is a file of an image: its content from a file on the build machine.
type imageFile struct {
	path string // in the image
	from string // on this machine
	mode int64
}

// buildStatic builds Go packages as static binaries (no cgo) into dir, with the Go build cache.
func buildStatic(t *testing.T, moduleDir, dir string, pkgs ...string) {
	t.Helper()
	cmd := exec.Command("go", append([]string{"build", "-trimpath", "-o", dir + "/"}, pkgs...)...)
	cmd.Dir = moduleDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %v: %v\n%s", pkgs, err, out)
	}
}

// buildImages writes the pause, agent and tether images as OCI archives (docker save layout,
// which `ctr images import` reads) into dir and returns their paths.
func buildImages(t *testing.T, dir string) []string {
	t.Helper()
	bin := filepath.Join(dir, "bin")
	buildStatic(t, Root(), bin, "./cmd/tetherd", "./cmd/tetherctl")
	buildStatic(t, filepath.Join(Root(), "test", "k8s"), bin, "./cmd/podagent")
	agent := filepath.Join(bin, "podagent")
	passwd := filepath.Join(dir, "passwd")
	os.WriteFile(passwd, []byte("root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n"), 0o644)
	images := []struct {
		ref        string
		files      []imageFile
		entrypoint []string
	}{
		{pauseImage, []imageFile{{"/pause", agent, 0o755}}, []string{"/pause", "pause"}},
		// /usr/bin/allowed and /usr/bin/denied are two files with the same content: exec grants
		// name files, so only the granted one may run. /usr/bin/victim is granted too, and the
		// test changes it.
		{agentImage, []imageFile{{"/usr/local/bin/podagent", agent, 0o755}, {"/usr/bin/allowed", agent, 0o755}, {"/usr/bin/denied", agent, 0o755},
			{"/usr/bin/victim", agent, 0o755}},
			[]string{"/usr/local/bin/podagent", "serve", ":8080"}},
		// What the Dockerfile builds, without its distroless base.
		{tetherImage, []imageFile{{"/usr/local/bin/tetherd", filepath.Join(bin, "tetherd"), 0o755},
			{"/usr/local/bin/tetherctl", filepath.Join(bin, "tetherctl"), 0o755}, {"/etc/passwd", passwd, 0o644}},
			[]string{"/usr/local/bin/tetherd"}},
	}
	var paths []string
	for _, im := range images {
		layer := layerTar(t, im.files)
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(layer)), nil })
		if err != nil {
			t.Fatal(err)
		}
		img, err := mutate.AppendLayers(empty.Image, l)
		if err != nil {
			t.Fatal(err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		cf = cf.DeepCopy()
		cf.OS, cf.Architecture = "linux", runtime.GOARCH
		cf.Config.Entrypoint = im.entrypoint
		cf.Config.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
		if img, err = mutate.ConfigFile(img, cf); err != nil {
			t.Fatal(err)
		}
		tag, err := name.NewTag(im.ref)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, path.Base(tag.RepositoryStr())+".tar")
		if err := tarball.WriteToFile(p, tag, img); err != nil {
			t.Fatalf("writing %s: %v", im.ref, err)
		}
		paths = append(paths, p)
	}
	return paths
}

// layerTar is one image layer holding files (and their directories).
func layerTar(t *testing.T, files []imageFile) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	for _, f := range files {
		var parents []string
		for d := path.Dir(f.path); d != "/"; d = path.Dir(d) {
			parents = append([]string{d}, parents...)
		}
		for _, d := range parents {
			if !dirs[d] {
				dirs[d] = true
				tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d[1:] + "/", Mode: 0o755})
			}
		}
		b, err := os.ReadFile(f.from)
		if err != nil {
			t.Fatal(err)
		}
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.path[1:], Mode: f.mode, Size: int64(len(b))})
		tw.Write(b)
	}
	// Directories tetherd and the runtime expect.
	for _, d := range []string{"tmp/", "proc/", "sys/", "dev/", "etc/", "run/"} {
		if !dirs["/"+d[:len(d)-1]] {
			mode := int64(0o755)
			if d == "tmp/" {
				mode = 0o1777
			}
			tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: mode})
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
