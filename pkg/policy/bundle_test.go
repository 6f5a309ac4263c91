package policy

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/bundletest"
)

// bundleResult is one call of StartBundle's callback.
type bundleResult struct {
	f   *Files
	err error
}

func next(t *testing.T, ch <-chan bundleResult, what string) bundleResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(15 * time.Second):
		t.Fatalf("no bundle callback: %s", what)
	}
	return bundleResult{}
}

// TestBundleService runs OPA's bundle downloader against a bundle server on loopback: the
// first bundle arrives, polls of an unchanged bundle are answered 304 (ETag) and deliver
// nothing, a new revision is delivered, and a bundle signed with another key or not signed at
// all is refused with the reason.
func TestBundleService(t *testing.T) {
	files, data := bundletest.Shipped(t)
	key := bundletest.NewKey(t, "tether-test")
	srv := bundletest.NewServer(t)
	srv.Set(bundletest.Build(t, "r1", files, data, &key))

	ch := make(chan bundleResult, 16)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stop, err := StartBundle(ctx, BundleOptions{Service: srv.URL, Resource: bundletest.Resource, MinDelay: time.Second, MaxDelay: time.Second,
		PublicKey: key.PublicPEM, KeyID: key.ID, Algorithm: "ES256"}, slog.New(slog.DiscardHandler),
		func(f *Files, err error) { ch <- bundleResult{f, err} })
	if err != nil {
		t.Fatal(err)
	}
	defer stop()

	r := next(t, ch, "the first bundle")
	if r.err != nil || !strings.HasPrefix(r.f.Revision, "r1+") || len(r.f.Modules) != len(files) {
		t.Fatalf("first bundle: %+v", r)
	}
	rev, err := Compile(ctx, r.f, schema(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := Check(ctx, rev, StandardProbes(time.Now())); err != nil {
		t.Fatal(err)
	}

	// Unchanged: the server answers 304 and nothing is delivered.
	time.Sleep(3500 * time.Millisecond)
	requests, served := srv.Counts()
	if requests < 2 || served != 1 {
		t.Errorf("after 3.5s of 1s polls: %d requests, %d answered with the bundle; want at least 2 and exactly 1", requests, served)
	}
	select {
	case r := <-ch:
		t.Fatalf("an unchanged bundle was delivered again: %+v", r)
	default:
	}

	// A new revision is delivered.
	data["tether_settings"].(map[string]any)["git_binary"] = "/opt/git/bin/git"
	srv.Set(bundletest.Build(t, "r2", files, data, &key))
	if r := next(t, ch, "revision r2"); r.err != nil || !strings.HasPrefix(r.f.Revision, "r2+") {
		t.Fatalf("second bundle: %+v", r)
	}

	// Signed with a key the daemon does not trust, or not signed at all: refused (and retried;
	// nothing is ever delivered).
	other := bundletest.NewKey(t, "tether-test")
	srv.Set(bundletest.Build(t, "r3", files, data, &other))
	refused(t, ch, "invalid ECDSA signature")
	srv.Set(bundletest.Build(t, "r4", files, data, nil))
	refused(t, ch, ".signatures.json")
}

// refused waits for a refusal whose reason contains want; a delivered bundle fails the test.
func refused(t *testing.T, ch <-chan bundleResult, want string) {
	t.Helper()
	for {
		r := next(t, ch, "a refusal: "+want)
		if r.err == nil {
			t.Fatalf("a bundle that should be refused was delivered: revision %s", r.f.Revision)
		}
		if strings.Contains(r.err.Error(), want) {
			t.Logf("refused: %v", r.err)
			return
		}
	}
}

// TestBundleServiceWithBearerToken: a private bundle server that wants a bearer token. Without
// credentials every download is refused (401) and nothing is delivered; with OPA's own credentials
// configuration ({"bearer": {"token_path": FILE}}) the bundle arrives. (pkg/config refuses two
// kinds of credentials at once and unknown kinds, which OPA's client would not.)
func TestBundleServiceWithBearerToken(t *testing.T) {
	files, data := bundletest.Shipped(t)
	srv := bundletest.NewServer(t)
	srv.RequireToken("s3cret-token")
	srv.Set(bundletest.Build(t, "private", files, data, nil))
	start := func(creds map[string]any) (<-chan bundleResult, func()) {
		ch := make(chan bundleResult, 16)
		ctx, cancel := context.WithCancel(context.Background())
		stop, err := StartBundle(ctx, BundleOptions{Service: srv.URL, Resource: bundletest.Resource, MinDelay: time.Second, MaxDelay: time.Second,
			Credentials: creds}, slog.New(slog.DiscardHandler), func(f *Files, err error) { ch <- bundleResult{f, err} })
		if err != nil {
			t.Fatal(err)
		}
		return ch, func() { stop(); cancel() }
	}
	ch, stop := start(nil)
	refused(t, ch, "Unauthorized")
	stop()
	if srv.Unauthorized() == 0 {
		t.Fatal("the server refused nothing")
	}

	token := filepath.Join(t.TempDir(), "token")
	os.WriteFile(token, []byte("s3cret-token\n"), 0o600)
	ch, stop = start(map[string]any{"bearer": map[string]any{"token_path": token}})
	defer stop()
	if r := next(t, ch, "the private bundle"); r.err != nil || !strings.HasPrefix(r.f.Revision, "private+") {
		t.Fatalf("with the token: %+v", r)
	}
}
