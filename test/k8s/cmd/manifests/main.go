// Command manifests renders deploy/kubernetes/ from the Helm chart (make manifests): tether.yaml
// with the chart's defaults and the namespace, and servicemonitor.yaml for clusters that run the
// Prometheus operator. With -check it fails when the files differ from a fresh rendering.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/tether-sh/tether/test/k8s"
)

func main() {
	check := flag.Bool("check", false, "fail when the committed files are stale instead of writing them")
	flag.Parse()
	files, err := k8s.Manifests()
	if err != nil {
		fmt.Fprintln(os.Stderr, "manifests:", err)
		os.Exit(1)
	}
	dir := filepath.Join(k8s.Root(), "deploy", "kubernetes")
	stale := 0
	for name, b := range files {
		path := filepath.Join(dir, name)
		if *check {
			old, _ := os.ReadFile(path)
			if !bytes.Equal(old, b) {
				fmt.Fprintf(os.Stderr, "%s is stale: run make manifests\n", path)
				stale++
			}
			continue
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "manifests:", err)
			os.Exit(1)
		}
		if err := os.WriteFile(path, b, 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "manifests:", err)
			os.Exit(1)
		}
	}
	if stale > 0 {
		os.Exit(1)
	}
}
