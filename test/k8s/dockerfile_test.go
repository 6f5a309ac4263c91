package k8s

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	appsv1 "k8s.io/api/apps/v1"
)

// TestDockerfile keeps the image definition correct without a Docker engine: it parses the
// Dockerfile with BuildKit's own parser, checks the stages (a Go build stage, a distroless static
// final stage that runs as a non-root user and whose entrypoint is the DaemonSet's command), and
// runs the build stage's go build command with its environment: the binaries must come out
// static (no interpreter, no shared libraries) and run.
func TestDockerfile(t *testing.T) {
	f, err := os.Open(filepath.Join(Root(), "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := parser.Parse(f)
	if err != nil {
		t.Fatal(err)
	}
	stages, metaArgs, err := instructions.Parse(res.AST, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(stages) != 2 || stages[0].Name != "build" {
		t.Fatalf("%d stages (first %q), want a build stage and the final one", len(stages), stages[0].Name)
	}
	goVersion := ""
	for _, a := range metaArgs {
		for _, kv := range a.Args {
			if kv.Key == "GO_VERSION" && kv.Value != nil {
				goVersion = *kv.Value
			}
		}
	}
	if goVersion == "" || !strings.HasPrefix(stages[0].BaseName, "golang:${GO_VERSION}") {
		t.Errorf("build stage from %q with GO_VERSION %q", stages[0].BaseName, goVersion)
	}
	if gomod, _ := os.ReadFile(filepath.Join(Root(), "go.mod")); !strings.Contains(string(gomod), "\ngo "+goVersion+"\n") {
		t.Errorf("the image builds with Go %s, go.mod asks for another", goVersion)
	}

	checkFinalStage(t, stages[1])
	checkBuildStep(t, stages[0])
}

// checkFinalStage checks the image's final stage: distroless, the two static binaries, a
// non-root user, the entrypoint the DaemonSet runs.
func checkFinalStage(t *testing.T, final instructions.Stage) {
	t.Helper()
	if !strings.HasPrefix(final.BaseName, "gcr.io/distroless/static") {
		t.Errorf("final stage from %s, want distroless static (the binaries are static)", final.BaseName)
	}
	var user string
	var entrypoint []string
	copied := false
	for _, c := range final.Commands {
		switch c := c.(type) {
		case *instructions.UserCommand:
			user = c.User
		case *instructions.EntrypointCommand:
			if c.PrependShell {
				t.Error("ENTRYPOINT in shell form: the final stage has no shell")
			}
			entrypoint = c.CmdLine
		case *instructions.CopyCommand:
			copied = c.From == "build" && slices.Equal(c.SourcePaths, []string{"/out/tetherd", "/out/tetherctl"}) && c.DestPath == "/usr/local/bin/"
		case *instructions.RunCommand:
			t.Error("RUN in the final stage: it has no shell")
		}
	}
	if user == "" || strings.HasPrefix(user, "0") || strings.HasPrefix(user, "root") {
		t.Errorf("the image's user is %q, want a non-root one", user)
	}
	if !copied {
		t.Error("the final stage does not copy /out/tetherd and /out/tetherctl from the build stage to /usr/local/bin/")
	}
	objs, err := Decode(mustRender(t, nil))
	if err != nil {
		t.Fatal(err)
	}
	ds := Find[*appsv1.DaemonSet](objs)[0]
	if cmd := ds.Spec.Template.Spec.Containers[0].Command; len(entrypoint) == 0 || !slices.Equal(cmd, entrypoint) {
		t.Errorf("the DaemonSet runs %v, the image's entrypoint is %v", cmd, entrypoint)
	}
}

// checkBuildStep runs the build stage's go build here, as the stage runs it, and checks that
// it makes static binaries that print the VERSION argument's default.
func checkBuildStep(t *testing.T, stage instructions.Stage) {
	t.Helper()
	env := os.Environ()
	var build string
	for _, c := range stage.Commands {
		switch c := c.(type) {
		case *instructions.EnvCommand:
			for _, kv := range c.Env {
				env = append(env, kv.Key+"="+kv.Value)
			}
		case *instructions.ArgCommand:
			for _, kv := range c.Args {
				if kv.Value != nil {
					env = append(env, kv.Key+"="+*kv.Value)
				}
			}
		case *instructions.RunCommand:
			if line := strings.Join(c.CmdLine, " "); strings.HasPrefix(line, "go build") {
				build = line
			}
		}
	}
	if build == "" || !strings.Contains(build, "-o /out/ ") {
		t.Fatalf("no go build -o /out/ step in the build stage: %q", build)
	}
	out := t.TempDir()
	cmd := exec.Command("sh", "-c", strings.Replace(build, "-o /out/ ", "-o "+out+"/ ", 1))
	cmd.Dir, cmd.Env = Root(), env
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", build, err, b)
	}
	for _, name := range []string{"tetherd", "tetherctl"} {
		path := filepath.Join(out, name)
		e, err := elf.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		libs, _ := e.ImportedLibraries()
		interp := slices.ContainsFunc(e.Progs, func(p *elf.Prog) bool { return p.Type == elf.PT_INTERP })
		e.Close()
		if interp || len(libs) > 0 {
			t.Errorf("%s is not static: interpreter %v, libraries %v", name, interp, libs)
		}
		if v, err := exec.Command(path, "--version").Output(); err != nil || !strings.HasSuffix(strings.TrimSpace(string(v)), " dev") && strings.TrimSpace(string(v)) != "dev" {
			t.Errorf("%s --version: %q %v, want the VERSION argument's default, dev", name, v, err)
		}
	}
}

func mustRender(t *testing.T, values map[string]any) string {
	t.Helper()
	m, err := Render(ChartDir(), values)
	if err != nil {
		t.Fatal(err)
	}
	return m
}
