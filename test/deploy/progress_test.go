package deploy

import (
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// TestLongBuildsShowProgress: the SPIRE and Kubernetes builds (minutes each, cold) print a line
// per step with the time elapsed, so nobody takes them for hung. Run with true standing in for go
// and an empty cache: every step runs, none builds anything, the repository is left alone.
func TestLongBuildsShowProgress(t *testing.T) {
	step := regexp.MustCompile(`(?m)^== \[\d+s\] (spire|k8s-bin): `)
	for target, want := range map[string]int{"spire-bin": 3, "k8s-bin": 4} {
		cache := t.TempDir()
		out, err := exec.Command("make", "-C", "../..", "--no-print-directory", "TETHER_CACHE="+cache, "GO=true", target).CombinedOutput()
		if err != nil {
			t.Fatalf("make %s: %v\n%s", target, err, out)
		}
		if n := len(step.FindAllString(string(out), -1)); n != want || !strings.Contains(string(out), "done, in "+cache) {
			t.Errorf("make %s: %d progress lines, want %d:\n%s", target, n, want, out)
		}
	}
}
