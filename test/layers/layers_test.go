// Package layers checks how tether's packages depend on each other: each imports only packages
// of lower layers (so pkg/daemon, which wires them, is the only one that knows them all), and
// cilium/ebpf and OPA each stay behind one package.
package layers

import (
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/tether-sh/tether/"

// layers are tether's packages, lowest first. A package may import packages of lower layers
// only; a new package must be placed here.
var layers = [][]string{
	{"pkg/dataplane", "pkg/bootclock", "pkg/panics", "pkg/grants", "pkg/cgroups", "pkg/bpffs", "pkg/version"},
	{"pkg/dataplane/dataplanetest", "pkg/identity", "pkg/compile", "pkg/events", "pkg/confine", "pkg/kernel"},
	{"pkg/agents", "pkg/escalation", "pkg/config", "pkg/guards"},
	{"pkg/credentials", "pkg/stepup", "pkg/killpath", "pkg/telemetry", "pkg/discovery", "pkg/containers", "pkg/dnsproxy"},
	{"pkg/policy", "pkg/control", "pkg/fleet"},
	{"pkg/api"},
	{"pkg/daemon"},
}

// only are the outside packages only one of tether's may import.
var only = map[string]string{
	"github.com/cilium/ebpf":               "pkg/kernel",
	"github.com/open-policy-agent/opa/v1/": "pkg/policy",
}

// TestNoUpwardImports: every package of pkg/ is in a layer and imports only lower ones, and
// cilium/ebpf and OPA are imported by their one package only.
func TestNoUpwardImports(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Imports " "}}`, module+"pkg/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	imports := map[string][]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		imports[strings.TrimPrefix(f[0], module)] = f[1:]
	}
	for _, v := range violations(imports) {
		t.Error(v)
	}
}

// violations lists what in imports (package -> its imports, tether's without the module path)
// breaks the layering.
func violations(imports map[string][]string) []string {
	layer := map[string]int{}
	for i, l := range layers {
		for _, p := range l {
			layer[p] = i
		}
	}
	var out []string
	for p, deps := range imports {
		at, ok := layer[p]
		if !ok {
			out = append(out, fmt.Sprintf("%s is in no layer: place it in test/layers", p))
			continue
		}
		for _, d := range deps {
			for prefix, owner := range only {
				if strings.HasPrefix(d, prefix) && p != owner {
					out = append(out, fmt.Sprintf("%s imports %s, which only %s may", p, d, owner))
				}
			}
			dep, ok := strings.CutPrefix(d, module)
			if !ok {
				continue
			}
			if l, ok := layer[dep]; ok && l >= at && dep != p {
				out = append(out, fmt.Sprintf("%s (layer %d) imports %s (layer %d): not a lower layer", p, at, dep, l))
			}
		}
	}
	slices.Sort(out)
	return out
}

// TestViolationsAreFound: an upward import, a package in no layer and OPA outside pkg/policy are
// each found.
func TestViolationsAreFound(t *testing.T) {
	got := violations(map[string][]string{
		"pkg/events":   {module + "pkg/agents"},
		"pkg/newthing": nil,
		"pkg/agents":   {"github.com/open-policy-agent/opa/v1/rego"},
		"pkg/api":      {module + "pkg/agents"},
	})
	if len(got) != 3 {
		t.Errorf("violations %q, want the upward import, the unplaced package and OPA outside pkg/policy", got)
	}
}
