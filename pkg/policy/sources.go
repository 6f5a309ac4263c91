package policy

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"
	"github.com/open-policy-agent/opa/v1/download"
	"github.com/open-policy-agent/opa/v1/plugins/rest"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/tester"

	"github.com/tether-sh/tether/pkg/panics"
)

// WatchDir calls changed, at most once per settle period, whenever a file below dir is written,
// created, removed or renamed (editors replace files). It stops when ctx ends.
func WatchDir(ctx context.Context, dir string, settle time.Duration, log *slog.Logger, changed func()) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watching %s: %w", dir, err)
	}
	add := func() error {
		return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return err
			}
			return w.Add(p)
		})
	}
	if err := add(); err != nil {
		w.Close()
		return fmt.Errorf("watching %s: %w", dir, err)
	}
	go func() {
		defer w.Close()
		var fire <-chan time.Time
		for {
			select {
			case <-ctx.Done():
				return
			case ev, ok := <-w.Events:
				if !ok {
					return
				}
				if ev.Has(fsnotify.Create) {
					add() // a new subdirectory
				}
				if fire == nil {
					fire = time.After(settle)
				}
			case err, ok := <-w.Errors:
				if !ok {
					return
				}
				log.Warn("watching the policy directory", "dir", dir, "error", err)
			case <-fire:
				fire = nil
				changed()
			}
		}
	}()
	return nil
}

// BundleOptions say where to download an OPA bundle from (the standard bundle service protocol:
// polling with ETag, or long polling where the server offers it) and how to verify it.
type BundleOptions struct {
	Service  string        // base URL of the bundle service
	Resource string        // path of the bundle below it
	MinDelay time.Duration // between polls
	MaxDelay time.Duration
	// Verification: when PublicKey is set, bundles must carry a valid signature (.signatures.json)
	// made with the key KeyID names.
	PublicKey string // PEM, or the HMAC secret for HS256
	KeyID     string
	Algorithm string // RS256, ES256, HS256, ...
	Scope     string
	// Credentials, TLS and Headers are OPA's own service configuration (its REST client's:
	// credentials such as {"bearer": {"token_path": ...}} or {"client_tls": {"cert": ...,
	// "private_key": ...}}, oauth2, s3_signing, gcp_metadata, azure_managed_identity; tls such
	// as {"ca_cert": ...}), so a private bundle server works as it does for OPA.
	Credentials map[string]any
	TLS         map[string]any
	Headers     map[string]string
}

// BundleClient is the REST client of o's bundle service, its configuration checked as OPA checks
// it.
func BundleClient(o BundleOptions) (rest.Client, error) {
	svc := map[string]any{"name": "tether", "url": o.Service}
	if o.Credentials != nil {
		svc["credentials"] = o.Credentials
	}
	if o.TLS != nil {
		svc["tls"] = o.TLS
	}
	if o.Headers != nil {
		svc["headers"] = o.Headers
	}
	cfg, err := json.Marshal(svc)
	if err != nil {
		return rest.Client{}, err
	}
	client, err := rest.New(cfg, nil)
	if err != nil {
		return rest.Client{}, fmt.Errorf("bundle service %s: %w", o.Service, err)
	}
	return client, nil
}

// StartBundle downloads the bundle now and then whenever it changes, handing each one (or the
// reason it could not be had) to got. Stop it with the returned function.
func StartBundle(ctx context.Context, o BundleOptions, log *slog.Logger, got func(*Files, error)) (func(), error) {
	client, err := BundleClient(o)
	if err != nil {
		return nil, err
	}
	minS, maxS := int64(o.MinDelay.Seconds()), int64(o.MaxDelay.Seconds())
	if minS < 1 {
		minS = 1
	}
	if maxS < minS {
		maxS = minS
	}
	dcfg := download.Config{Polling: download.PollingConfig{MinDelaySeconds: &minS, MaxDelaySeconds: &maxS}}
	if err := dcfg.ValidateAndInjectDefaults(); err != nil {
		return nil, fmt.Errorf("bundle polling: %w", err)
	}
	source := strings.TrimSuffix(o.Service, "/") + "/" + strings.TrimPrefix(o.Resource, "/")
	d := download.New(dcfg, client, o.Resource).WithCallback(func(_ context.Context, u download.Update) error {
		switch {
		case u.Error != nil:
			got(nil, fmt.Errorf("bundle %s: %w", source, u.Error))
		case u.Bundle != nil:
			var f *Files
			if err := panics.Run(BoundaryBundle, func() error { f = FromBundle(u.Bundle, source); return nil }); err != nil {
				got(nil, fmt.Errorf("bundle %s: %w", source, err))
				return nil
			}
			got(f, nil)
		}
		return nil
	})
	if o.PublicKey != "" {
		alg := o.Algorithm
		if alg == "" {
			alg = "RS256"
		}
		keys := map[string]*bundle.KeyConfig{o.KeyID: {Key: o.PublicKey, Algorithm: alg, Scope: o.Scope}}
		d = d.WithBundleVerificationConfig(bundle.NewVerificationConfig(keys, o.KeyID, o.Scope, nil))
	}
	d.Start(ctx)
	return func() { d.Stop(context.Background()) }, nil
}

// BoundaryBundle counts the policy revisions (bundles, directories) whose reading, compiling or
// checking panicked (see panics).
var BoundaryBundle = panics.Declare("policy")

// TestResult is one Rego unit test.
type TestResult struct {
	Name     string
	Package  string
	Location string
	Pass     bool
	Fail     bool
	Err      string
	Duration time.Duration
}

// RunTests runs the *_test.rego of f against its modules and data with OPA's tester.
func RunTests(ctx context.Context, f *Files) ([]TestResult, error) {
	mods := map[string]*ast.Module{}
	for n, m := range f.Modules {
		mods[n] = m
	}
	for n, m := range f.Tests {
		mods[n] = m
	}
	ch, err := tester.NewRunner().SetStore(inmem.NewFromObject(f.Data)).CapturePrintOutput(true).Run(ctx, mods)
	if err != nil {
		return nil, fmt.Errorf("running the policy tests: %w", err)
	}
	var out []TestResult
	for r := range ch {
		tr := TestResult{Name: r.Name, Package: r.Package, Pass: r.Pass(), Fail: r.Fail, Duration: r.Duration}
		if r.Location != nil {
			tr.Location = fmt.Sprintf("%s:%d", r.Location.File, r.Location.Row)
		}
		if r.Error != nil {
			tr.Err = r.Error.Error()
		}
		out = append(out, tr)
	}
	return out, nil
}
