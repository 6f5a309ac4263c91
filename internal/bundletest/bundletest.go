// Package bundletest is an OPA bundle service for tests: it serves one bundle on loopback the way
// a bundle server does (ETag, 304 Not Modified when the client has it), and builds bundles from
// files, optionally signed.
package bundletest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/open-policy-agent/opa/v1/bundle"

	"github.com/tether-sh/tether/policies"
)

// Resource is where Server serves its bundle.
const Resource = "bundles/tether.tar.gz"

// Server serves one bundle at Resource.
type Server struct {
	URL string
	srv *httptest.Server

	mu       sync.Mutex
	body     []byte
	etag     string
	down     Outage
	requests int // every GET of the bundle
	served   int // GETs answered with the bundle (not 304)
	token    string
	refused  int // GETs without the token
}

// RequireToken makes the server answer 401 to a request without "Authorization: Bearer token"
// (a private bundle server).
func (s *Server) RequireToken(token string) {
	s.mu.Lock()
	s.token = token
	s.mu.Unlock()
}

// Unauthorized counts the requests refused for want of the token.
func (s *Server) Unauthorized() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.refused
}

// NewServer starts a server on loopback; it stops when the test ends. Until Set, it answers 404.
func NewServer(t testing.TB) *Server {
	t.Helper()
	s := &Server{}
	s.srv = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.srv.Close)
	s.URL = s.srv.URL
	return s
}

// Outage is how the server fails while it is down.
type Outage int

const (
	Up           Outage = iota
	Unavailable         // 503 Service Unavailable
	ResetsStream        // the connection is closed without an answer
)

// SetDown makes the server fail as o (Up: serve again).
func (s *Server) SetDown(o Outage) {
	s.mu.Lock()
	s.down = o
	s.mu.Unlock()
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/"+Resource {
		http.NotFound(w, r)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.token != "" && r.Header.Get("Authorization") != "Bearer "+s.token {
		s.refused++
		http.Error(w, "a bearer token is required", http.StatusUnauthorized)
		return
	}
	s.requests++
	switch s.down {
	case Unavailable:
		http.Error(w, "down for the test", http.StatusServiceUnavailable)
		return
	case ResetsStream:
		if hj, ok := w.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				c.Close()
				return
			}
		}
		http.Error(w, "down for the test", http.StatusServiceUnavailable)
		return
	}
	if s.body == nil {
		http.NotFound(w, r)
		return
	}
	if r.Header.Get("If-None-Match") == s.etag {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	s.served++
	w.Header().Set("ETag", s.etag)
	w.Header().Set("Content-Type", "application/gzip")
	w.Write(s.body)
}

// Set serves body from now on.
func (s *Server) Set(body []byte) {
	sum := sha256.Sum256(body)
	s.mu.Lock()
	s.body, s.etag = body, `"`+hex.EncodeToString(sum[:8])+`"`
	s.mu.Unlock()
}

// Counts are the GETs of the bundle so far, and how many were answered with it (not 304).
func (s *Server) Counts() (requests, served int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests, s.served
}

// Key is a signing key for bundles (ES256).
type Key struct {
	ID         string
	PrivatePEM string
	PublicPEM  string
}

// NewKey makes a fresh ES256 key.
func NewKey(t testing.TB, id string) Key {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	priv, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return Key{
		ID:         id,
		PrivatePEM: string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: priv})),
		PublicPEM:  string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})),
	}
}

// Build makes a bundle (tar.gz) of Rego files (path -> source) and data, with the manifest
// revision given, signed with key when key is not nil.
func Build(t testing.TB, revision string, files map[string]string, data map[string]any, key *Key) []byte {
	t.Helper()
	b := bundle.Bundle{Manifest: bundle.Manifest{Revision: revision}, Data: data}
	if b.Data == nil {
		b.Data = map[string]any{}
	}
	paths := make([]string, 0, len(files))
	for p := range files {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		b.Modules = append(b.Modules, bundle.ModuleFile{URL: "/" + p, Path: "/" + p, Raw: []byte(files[p])})
	}
	if key != nil {
		if err := b.GenerateSignature(bundle.NewSigningConfig(key.PrivatePEM, "ES256", ""), key.ID, false); err != nil {
			t.Fatal(err)
		}
	}
	var buf bytes.Buffer
	if err := bundle.NewWriter(&buf).Write(b); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// Shipped returns the shipped Rego (without its tests) and data, the content of a bundle that
// carries tether's own policy.
func Shipped(t testing.TB) (map[string]string, map[string]any) {
	t.Helper()
	files := map[string]string{}
	names, err := fs.Glob(policies.FS, "tether/*.rego")
	if err != nil || len(names) == 0 {
		t.Fatalf("no shipped Rego: %v", err)
	}
	for _, n := range names {
		if strings.HasSuffix(n, "_test.rego") {
			continue
		}
		b, err := policies.FS.ReadFile(n)
		if err != nil {
			t.Fatal(err)
		}
		files[n] = string(b)
	}
	raw, err := policies.FS.ReadFile("data.json")
	if err != nil {
		t.Fatal(err)
	}
	var data map[string]any
	if err := json.Unmarshal(raw, &data); err != nil {
		t.Fatal(err)
	}
	return files, data
}
