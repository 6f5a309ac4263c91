// Package k8s renders tether's Helm chart the way `helm template` does, and decodes what it
// renders strictly against the Kubernetes API types (unknown and duplicate fields are errors).
package k8s

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
)

// KubeVersion is the Kubernetes version the chart is rendered for and checked against (the
// kube-apiserver make test-k8s builds, and k8s.io/api in go.mod).
const KubeVersion = "v1.37.2"

// Namespace and Release are what the plain manifests are rendered with.
const (
	Namespace = "tether-system"
	Release   = "tether"
)

// Root is the repository's root directory.
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// ChartDir is deploy/helm/tether.
func ChartDir() string { return filepath.Join(Root(), "deploy", "helm", "tether") }

// Render renders the chart with values over its values.yaml, as `helm template tether
// deploy/helm/tether -n tether-system` does, and returns the manifest (YAML documents).
func Render(chartDir string, values map[string]any) (string, error) {
	return RenderRelease(chartDir, Release, values)
}

// RenderRelease is Render with another release name.
func RenderRelease(chartDir, release string, values map[string]any) (string, error) {
	ch, err := loader.Load(chartDir)
	if err != nil {
		return "", fmt.Errorf("loading the chart: %w", err)
	}
	kv, err := chartutil.ParseKubeVersion(KubeVersion)
	if err != nil {
		return "", err
	}
	install := action.NewInstall(&action.Configuration{Log: func(string, ...any) {}})
	install.DryRun, install.ClientOnly, install.Replace = true, true, true
	install.ReleaseName, install.Namespace = release, Namespace
	install.KubeVersion = kv
	install.IncludeCRDs = true // the AgentKill CRD (crds/), as `helm template --include-crds`
	rel, err := install.Run(ch, values)
	if err != nil {
		return "", fmt.Errorf("rendering the chart: %w", err)
	}
	return rel.Manifest, nil
}

// ShippedPolicyFiles are the shipped policies (policies/tether/*.rego without the tests) as the
// chart's policy.files value takes them: name -> content.
func ShippedPolicyFiles() (map[string]any, error) {
	files := map[string]any{}
	rego, err := filepath.Glob(filepath.Join(Root(), "policies", "tether", "*.rego"))
	if err != nil {
		return nil, err
	}
	for _, f := range rego {
		if strings.HasSuffix(f, "_test.rego") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		files[filepath.Base(f)] = string(b)
	}
	return files, nil
}

// Object is one decoded manifest document.
type Object struct {
	GVK    schema.GroupVersionKind
	Name   string
	Source string // the template it came from (# Source: line), when known
	Raw    []byte
	Obj    k8sruntime.Object
}

// scheme knows the built-in API types, CustomResourceDefinitions and the Prometheus operator's
// (ServiceMonitor).
var scheme = func() *k8sruntime.Scheme {
	s := k8sruntime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		panic(err)
	}
	if err := monitoringv1.AddToScheme(s); err != nil {
		panic(err)
	}
	if err := apiextensionsv1.AddToScheme(s); err != nil {
		panic(err)
	}
	return s
}()

var strict = serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()

// Decode splits manifest into documents and decodes each strictly into its API type: an unknown
// kind, an unknown or duplicate field, or a value of the wrong type is an error naming the
// document.
func Decode(manifest string) ([]Object, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(manifest)))
	var objs []Object
	var errs []error
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		o := Object{Raw: doc, Source: source(doc)}
		obj, gvk, err := strict.Decode(doc, nil, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", o.Source, err))
			continue
		}
		o.Obj, o.GVK = obj, *gvk
		if m, ok := obj.(interface{ GetName() string }); ok {
			o.Name = m.GetName()
		}
		objs = append(objs, o)
	}
	return objs, errors.Join(errs...)
}

func stripComments(doc []byte) []byte {
	var out [][]byte
	for _, l := range bytes.Split(doc, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(l), []byte("#")) {
			out = append(out, l)
		}
	}
	return bytes.Join(out, []byte("\n"))
}

func source(doc []byte) string {
	for _, l := range strings.Split(string(doc), "\n") {
		if s, ok := strings.CutPrefix(l, "# Source: "); ok {
			return s
		}
	}
	return "a document"
}

// Find returns the objects of one kind.
func Find[T k8sruntime.Object](objs []Object) []T {
	var out []T
	for _, o := range objs {
		if t, ok := o.Obj.(T); ok {
			out = append(out, t)
		}
	}
	return out
}

// PlainValues are the values the plain manifests are rendered with: the chart's defaults, and
// the namespace created by the manifests themselves.
func PlainValues() map[string]any { return map[string]any{"createNamespace": true} }

// Manifests renders deploy/kubernetes/: tether.yaml (everything but the ServiceMonitor) and
// servicemonitor.yaml (the ServiceMonitor alone, for clusters with the Prometheus operator).
func Manifests() (map[string][]byte, error) {
	const header = "# Generated by `make manifests` from deploy/helm/tether (helm template tether deploy/helm/tether\n# -n tether-system --set createNamespace=true%s). Do not edit: change the chart.\n"
	plain, err := Render(ChartDir(), PlainValues())
	if err != nil {
		return nil, err
	}
	vals := PlainValues()
	vals["serviceMonitor"] = map[string]any{"enabled": true}
	withSM, err := Render(ChartDir(), vals)
	if err != nil {
		return nil, err
	}
	var sm []string
	for _, doc := range strings.Split(withSM, "\n---\n") {
		if strings.Contains(doc, "\nkind: ServiceMonitor\n") {
			sm = append(sm, doc)
		}
	}
	if len(sm) != 1 {
		return nil, fmt.Errorf("rendering with serviceMonitor.enabled gave %d ServiceMonitors, want 1", len(sm))
	}
	return map[string][]byte{
		"tether.yaml":         []byte(fmt.Sprintf(header, "") + strings.TrimLeft(plain, "-\n")),
		"servicemonitor.yaml": []byte(fmt.Sprintf(header, " --set serviceMonitor.enabled=true, its ServiceMonitor") + strings.TrimSpace(sm[0]) + "\n"),
	}, nil
}
