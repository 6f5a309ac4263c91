package credentials

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func newIssuer(t *testing.T, dir string, c *clock) *Issuer {
	t.Helper()
	i, err := New(Options{KeyFile: filepath.Join(dir, "key.pem"), Dir: filepath.Join(dir, "creds"), Issuer: "tether://node-a", TTL: 5 * time.Minute, Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	return i
}

func subject(c *clock) Subject {
	return Subject{Slot: 3, SpiffeID: "spiffe://x.org/agent", UID: uint32(os.Getuid()), TaskID: "task-1", TaskType: "coding",
		Sensitivity: "internal", TaskExpires: c.t.Add(time.Hour)}
}

// checkIssued checks the file and the claims of cred, issued by i for s, expiring at expiry.
func checkIssued(t *testing.T, i *Issuer, s Subject, cred Credential, expiry time.Time) {
	t.Helper()
	b, err := os.ReadFile(cred.File)
	if err != nil || strings.TrimSpace(string(b)) != cred.Token {
		t.Fatalf("credential file %s: %q %v", cred.File, b, err)
	}
	if fi, _ := os.Stat(cred.File); fi.Mode().Perm() != 0o400 {
		t.Errorf("file mode %v, want 0400", fi.Mode().Perm())
	}
	if fi, _ := os.Stat(filepath.Dir(cred.File)); fi.Mode().Perm() != 0o500 {
		t.Errorf("directory mode %v, want 0500", fi.Mode().Perm())
	}
	claims, err := i.Verify(cred.Token)
	if err != nil {
		t.Fatal(err)
	}
	if claims.Subject != s.SpiffeID || claims.Audience[0] != "tether-task:task-1" || claims.Task.Type != "coding" || claims.Task.Sensitivity != "internal" ||
		claims.Slot != 3 || !claims.Expiry.Time().Equal(expiry) {
		t.Errorf("claims %+v", claims)
	}
}

// checkForeignRefused: another task's credential, one another key signed and garbage renew
// nothing (ErrInvalid).
func checkForeignRefused(t *testing.T, i *Issuer, s Subject, current Credential, c *clock) {
	t.Helper()
	ctx := context.Background()
	other := s
	other.TaskID = "task-2"
	if _, err := i.Renew(ctx, other, current.Token); !errors.Is(err, ErrInvalid) {
		t.Errorf("credential of another task: %v", err)
	}
	forger := newIssuer(t, t.TempDir(), c)
	forged, _ := forger.Issue(ctx, s)
	if _, err := i.Renew(ctx, s, forged.Token); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "not signed by this tetherd") {
		t.Errorf("credential signed by another key: %v", err)
	}
	if _, err := i.Renew(ctx, s, "not a token"); !errors.Is(err, ErrInvalid) {
		t.Errorf("garbage: %v", err)
	}
}

func TestIssueRenewRevoke(t *testing.T) {
	dir := t.TempDir()
	c := &clock{time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)}
	i := newIssuer(t, dir, c)
	s := subject(c)
	ctx := context.Background()

	first, err := i.Issue(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	checkIssued(t, i, s, first, c.t.Add(5*time.Minute))

	// A heartbeat presents the current credential and gets the next one.
	c.t = c.t.Add(time.Minute)
	second, err := i.Renew(ctx, s, first.Token)
	if err != nil {
		t.Fatal(err)
	}
	if second.ID == first.ID {
		t.Fatal("renewal gave the same credential")
	}
	// The first one again: replayed.
	if _, err := i.Renew(ctx, s, first.Token); !errors.Is(err, ErrReplayed) {
		t.Errorf("replayed credential: %v", err)
	}
	checkForeignRefused(t, i, s, second, c)

	// A restarted tetherd (same key and directory) knows which one is current.
	i = newIssuer(t, dir, c)
	if _, err := i.Renew(ctx, s, first.Token); !errors.Is(err, ErrReplayed) {
		t.Errorf("replay after a restart: %v", err)
	}
	third, err := i.Renew(ctx, s, second.Token)
	if err != nil {
		t.Fatal(err)
	}

	// Missed heartbeats: the current one expires and cannot renew.
	c.t = c.t.Add(6 * time.Minute)
	if _, err := i.Renew(ctx, s, third.Token); !errors.Is(err, ErrExpired) {
		t.Errorf("expired credential: %v", err)
	}
	if _, err := i.Verify(third.Token); !errors.Is(err, ErrExpired) {
		t.Errorf("verify expired: %v", err)
	}

	// The task ends: unexpired credentials are revoked and listed until they expire.
	c.t = c.t.Add(-6 * time.Minute)
	i.Revoke(s.Slot, s.TaskID, "task ended")
	if _, err := i.Verify(third.Token); !errors.Is(err, ErrRevoked) {
		t.Errorf("verify revoked: %v", err)
	}
	if _, err := i.Renew(ctx, s, third.Token); !errors.Is(err, ErrRevoked) {
		t.Errorf("renew revoked: %v", err)
	}
	list := i.Revoked()
	if len(list) != 3 || list[0].TaskID != "task-1" || list[0].Reason != "task ended" {
		t.Errorf("revocation list %+v, want the 3 unexpired credentials", list)
	}
	if _, err := os.Stat(third.File); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("credential file left after revocation: %v", err)
	}
	c.t = c.t.Add(time.Hour)
	if list := i.Revoked(); len(list) != 0 {
		t.Errorf("credentials listed long after they expired: %+v", list)
	}
}

func TestCredentialNeverOutlivesTask(t *testing.T) {
	c := &clock{time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)}
	i := newIssuer(t, t.TempDir(), c)
	s := subject(c)
	s.TaskExpires = c.t.Add(90 * time.Second)
	cred, err := i.Issue(context.Background(), s)
	if err != nil {
		t.Fatal(err)
	}
	if !cred.ExpiresAt.Equal(s.TaskExpires) {
		t.Errorf("credential expires %s, the task %s", cred.ExpiresAt, s.TaskExpires)
	}
	s.TaskExpires = c.t
	if _, err := i.Issue(context.Background(), s); err == nil {
		t.Error("issued a credential for an expired task")
	}
}

// TestKeysVerify: a relying party verifies with the published key set alone.
func TestKeysVerify(t *testing.T) {
	c := &clock{time.Now()}
	i := newIssuer(t, t.TempDir(), c)
	cred, err := i.Issue(context.Background(), subject(c))
	if err != nil {
		t.Fatal(err)
	}
	keys := i.Keys()
	tok, err := jwt.ParseSigned(cred.Token, []jose.SignatureAlgorithm{jose.EdDSA})
	if err != nil {
		t.Fatal(err)
	}
	found := keys.Key(tok.Headers[0].KeyID)
	if len(found) != 1 {
		t.Fatalf("key %q not in the key set", tok.Headers[0].KeyID)
	}
	var claims Claims
	if err := tok.Claims(found[0].Key, &claims); err != nil || claims.Subject != "spiffe://x.org/agent" {
		t.Errorf("verifying with the published key: %v %+v", err, claims)
	}
}

// A task's end is told late, after the agent's next task was issued its credential: the
// revocation must leave the next task's file in place.
func TestLateRevokeKeepsTheNextTasksFile(t *testing.T) {
	dir := t.TempDir()
	c := &clock{time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)}
	i := newIssuer(t, dir, c)
	ctx := context.Background()
	first := subject(c)
	if _, err := i.Issue(ctx, first); err != nil {
		t.Fatal(err)
	}
	next := first
	next.TaskID = "task-2"
	cred, err := i.Issue(ctx, next)
	if err != nil {
		t.Fatal(err)
	}
	i.Revoke(first.Slot, first.TaskID, "task expired")
	b, err := os.ReadFile(cred.File)
	if err != nil || strings.TrimSpace(string(b)) != cred.Token {
		t.Fatalf("the next task's credential file after the first task's revocation: %q %v", b, err)
	}
	i.Revoke(next.Slot, next.TaskID, "task ended")
	if _, err := os.Stat(cred.File); !os.IsNotExist(err) {
		t.Errorf("the last task's file is left after its revocation: %v", err)
	}
}

// TestConcurrentIssuesLeaveTheCurrentInTheFile: a launcher's heartbeat and the agent's own
// renewal can issue at the same moment; whatever the order, the file holds the credential the
// issuer records as current, and no issue fails on the other's temporary file.
func TestConcurrentIssuesLeaveTheCurrentInTheFile(t *testing.T) {
	c := &clock{time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)}
	i := newIssuer(t, t.TempDir(), c)
	s := subject(c)
	ctx := context.Background()
	for round := range 50 {
		var wg sync.WaitGroup
		errs, files := make([]error, 4), make([]string, 4)
		for g := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cred, err := i.Issue(ctx, s)
				errs[g], files[g] = err, cred.File
			}()
		}
		wg.Wait()
		file := files[0]
		for _, err := range errs {
			if err != nil {
				t.Fatalf("round %d: an issue failed: %v", round, err)
			}
		}
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		id, err := i.idOf(strings.TrimSpace(string(b)), s)
		current, _ := i.Current(s.Slot, s.TaskID)
		if err != nil || id != current {
			t.Fatalf("round %d: the file holds credential %s (%v), the issuer's current is %s", round, id, err, current)
		}
	}
}
