package policy

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/open-policy-agent/opa/v1/bundle"

	"github.com/tether-sh/tether/pkg/panics"
)

// FuzzBundle: whatever a bundle server serves (the archive as bytes, or a well-formed archive of
// any module and data), tetherd puts a revision in force or refuses it with why, and never
// panics; a refused revision leaves the one in force.
func FuzzBundle(f *testing.F) {
	f.Add([]byte{}, "package tether.grants\n\ndefault egress := []\n", []byte(`{"x":1}`))
	f.Add([]byte{0x1f, 0x8b}, "package tether.grants\negress contains x if { x := input.agent.labels[_] }", []byte(`[]`))
	f.Add(tarball(f, map[string][]byte{"/p.rego": []byte("package p\nallow if true"), "/data.json": []byte("{}")}), "package", []byte(`{"a":`))
	f.Fuzz(func(t *testing.T, raw []byte, module string, data []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		before := panics.Counts()[BoundaryBundle]
		e := NewEngine(schema(t), slog.New(slog.DiscardHandler))
		offer := func(archive []byte) {
			b, err := bundle.NewReader(bytes.NewReader(archive)).Read()
			if err != nil {
				return
			}
			f := FromBundle(&b, "fuzz")
			if rev, err := e.Offer(ctx, f, StandardProbes(time.Now())); err == nil && rev == nil {
				t.Fatal("an offered revision neither refused nor in force")
			}
		}
		offer(raw)
		offer(tarball(t, map[string][]byte{"/policy.rego": []byte(module), "/data.json": data}))
		if panics.Counts()[BoundaryBundle] != before {
			t.Fatal("reading a bundle panicked")
		}
	})
}

// tarball is a gzipped tar of files, as a bundle server serves one.
func tarball(t testing.TB, files map[string][]byte) []byte {
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	for name, b := range files {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b))}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
