// Package credentials issues per-task credentials: a short-lived token scoped to one task of one
// agent, delivered only to that agent (a file in a private tmpfs, readable by the agent's uid),
// renewed only while the launcher's heartbeats present the current one, and revoked (put on a
// list relying parties fetch) when the task ends, expires or misses its heartbeat.
//
// The token is a JWT-SVID from SPIRE (audience: the task) for agents SPIRE attested, else a JWT
// signed with tether's own ed25519 key (EdDSA; the public key is published as a JWK set).
package credentials

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// Kinds of credential.
const (
	KindTether  = "tether-jwt"
	KindJWTSVID = "jwt-svid"
)

// AudiencePrefix makes the audience of a task's credential: AudiencePrefix + task ID.
const AudiencePrefix = "tether-task:"

// FileName is the credential file in the agent's directory.
const FileName = "task.jwt"

// Errors of a presented credential.
var (
	ErrExpired  = errors.New("credential expired")
	ErrRevoked  = errors.New("credential revoked")
	ErrReplayed = errors.New("credential replayed")
	ErrInvalid  = errors.New("credential invalid")
)

// JWTSource issues JWT-SVIDs (SPIRE's Delegated Identity API).
type JWTSource interface {
	FetchJWTSVID(ctx context.Context, pid int, audience string) (token string, spiffeID string, expires time.Time, err error)
}

// Options configure an Issuer.
type Options struct {
	// KeyFile holds tether's ed25519 signing key (PKCS#8 PEM); it is created when missing.
	KeyFile string
	// Dir gets one directory per agent, holding its credential file. It should be a tmpfs that
	// only tetherd mounts (see MountTmpfs); issuer state is kept there too, so a restarted
	// tetherd still knows which credentials are current and which are revoked.
	Dir string
	// Issuer is the iss claim.
	Issuer string
	// TTL is the lifetime of one credential; a heartbeat brings a new one. Never past the task.
	TTL time.Duration
	// SPIRE, when set, issues JWT-SVIDs for agents it attested.
	SPIRE JWTSource
	Now   func() time.Time
	Log   *slog.Logger
}

// Subject is the agent and task a credential is for.
type Subject struct {
	Slot     dataplane.Slot
	SpiffeID string
	UID      uint32 // the agent's uid: the only one that can read the file
	TaskID   string
	TaskType string
	// Sensitivity and TaskExpires are the signed task state.
	Sensitivity string
	TaskExpires time.Time
	// SPIREPID is a process SPIRE attested for the agent (0: none): the credential is then a
	// JWT-SVID SPIRE issues it.
	SPIREPID int
	// HandoffFrom is the SPIFFE ID of the agent that handed this task over (empty: none).
	HandoffFrom string
}

// Credential is an issued credential.
type Credential struct {
	Token     string         `json:"token"`
	ID        string         `json:"id"` // jti; for a JWT-SVID, the SHA-256 of the token
	Kind      string         `json:"kind"`
	Slot      dataplane.Slot `json:"agent_slot"`
	SpiffeID  string         `json:"spiffe_id"`
	TaskID    string         `json:"task_id"`
	Audience  string         `json:"audience"`
	IssuedAt  time.Time      `json:"issued_at"`
	ExpiresAt time.Time      `json:"expires_at"`
	File      string         `json:"file,omitempty"`
}

// Claims are the claims of a tether-signed credential.
type Claims struct {
	jwt.Claims
	Slot        dataplane.Slot `json:"agent_slot"`
	Task        TaskClaim      `json:"task"`
	HandoffFrom string         `json:"handoff_from,omitempty"`
}

// TaskClaim is the task state a credential carries.
type TaskClaim struct {
	ID          string `json:"id"`
	Type        string `json:"type"`
	Sensitivity string `json:"sensitivity,omitempty"`
	ExpiresAt   int64  `json:"expires_at"`
}

// Revocation is an entry of the revocation list.
type Revocation struct {
	ID        string    `json:"id"`
	Kind      string    `json:"kind"`
	SpiffeID  string    `json:"spiffe_id"`
	TaskID    string    `json:"task_id"`
	Reason    string    `json:"reason"`
	RevokedAt time.Time `json:"revoked_at"`
	ExpiresAt time.Time `json:"expires_at"` // listed until Skew after: it is invalid anyway by then
}

// Skew is how long a credential stays on the revocation list after it expired, and how long
// after its expiry one is still put there: relying parties whose clocks run behind still see it.
const Skew = 5 * time.Minute

// issued is what the issuer remembers of a credential.
type issued struct {
	ID        string    `json:"id"`
	Kind      string    `json:"kind"`
	ExpiresAt time.Time `json:"expires_at"`
	IssuedAt  time.Time `json:"issued_at"`
}

// taskState is what the issuer remembers of one task's credentials.
type taskState struct {
	Slot     dataplane.Slot `json:"slot"`
	SpiffeID string         `json:"spiffe_id"`
	TaskID   string         `json:"task_id"`
	Current  string         `json:"current"`
	Issued   []issued       `json:"issued"` // unexpired, oldest first
}

type state struct {
	Tasks   map[string]*taskState  `json:"tasks"` // by slot/task
	Revoked map[string]*Revocation `json:"revoked"`
}

// Issuer issues, renews, verifies and revokes task credentials. It is safe for concurrent use.
type Issuer struct {
	opts Options
	key  ed25519.PrivateKey
	kid  string

	// issueMu makes an issue's file and its record one step: of two issues at once (a launcher's
	// heartbeat and the agent's own renewal), the file holds the one recorded as current.
	issueMu sync.Mutex

	mu sync.Mutex
	st state
}

// New loads (or creates) the signing key and the state kept in opts.Dir.
func New(opts Options) (*Issuer, error) {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.TTL <= 0 {
		return nil, errors.New("credential ttl must be positive")
	}
	key, err := loadKey(opts.KeyFile)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(key.Public().(ed25519.PublicKey))
	i := &Issuer{opts: opts, key: key, kid: hex.EncodeToString(sum[:8]), st: state{Tasks: map[string]*taskState{}, Revoked: map[string]*Revocation{}}}
	if err := os.MkdirAll(opts.Dir, 0o711); err != nil {
		return nil, fmt.Errorf("credential directory: %w", err)
	}
	if b, err := os.ReadFile(i.statePath()); err == nil {
		if err := json.Unmarshal(b, &i.st); err != nil {
			return nil, fmt.Errorf("credential state %s: %w", i.statePath(), err)
		}
		if i.st.Tasks == nil {
			i.st.Tasks = map[string]*taskState{}
		}
		if i.st.Revoked == nil {
			i.st.Revoked = map[string]*Revocation{}
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("credential state: %w", err)
	}
	return i, nil
}

// loadKey reads an ed25519 key, or creates one (0600) when the file does not exist.
func loadKey(path string) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, fmt.Errorf("credential signing key: %w", err)
		}
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return nil, fmt.Errorf("credential signing key: %w", err)
		}
		return key, nil
	}
	if err != nil {
		return nil, fmt.Errorf("credential signing key: %w", err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		return nil, fmt.Errorf("credential signing key %s: not PEM", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("credential signing key %s: %w", path, err)
	}
	key, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("credential signing key %s: %T, want an ed25519 key", path, k)
	}
	return key, nil
}

func (i *Issuer) statePath() string { return filepath.Join(i.opts.Dir, ".state.json") }

func taskKey(slot dataplane.Slot, taskID string) string {
	return strconv.FormatUint(uint64(slot), 10) + "/" + taskID
}

// save writes the state. Call with i.mu held.
func (i *Issuer) save() {
	b, _ := json.Marshal(i.st)
	tmp := i.statePath() + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err == nil {
		err = os.Rename(tmp, i.statePath())
		if err == nil {
			return
		}
	}
	i.opts.Log.Error("saving credential state: a restarted tetherd will not know the credentials issued since", "dir", i.opts.Dir)
}

// prune drops what expired. Call with i.mu held.
func (i *Issuer) prune(now time.Time) {
	for id, r := range i.st.Revoked {
		if !r.ExpiresAt.Add(Skew).After(now) {
			delete(i.st.Revoked, id)
		}
	}
	for _, t := range i.st.Tasks {
		t.Issued = slices.DeleteFunc(t.Issued, func(c issued) bool { return !c.ExpiresAt.Add(Skew).After(now) && c.ID != t.Current })
	}
}

// Issue issues a new credential for s's task and delivers it to the agent's file; the ones
// issued before for the task stay valid until they expire, but only the new one renews.
func (i *Issuer) Issue(ctx context.Context, s Subject) (Credential, error) {
	now := i.opts.Now()
	if !s.TaskExpires.After(now) {
		return Credential{}, fmt.Errorf("task %s has expired", s.TaskID)
	}
	aud := AudiencePrefix + s.TaskID
	c := Credential{Slot: s.Slot, SpiffeID: s.SpiffeID, TaskID: s.TaskID, Audience: aud, IssuedAt: now}
	if s.SPIREPID > 0 && i.opts.SPIRE != nil {
		tok, id, exp, err := i.opts.SPIRE.FetchJWTSVID(ctx, s.SPIREPID, aud)
		if err != nil {
			return Credential{}, fmt.Errorf("JWT-SVID from SPIRE for task %s: %w", s.TaskID, err)
		}
		if id != s.SpiffeID {
			return Credential{}, fmt.Errorf("SPIRE issued a JWT-SVID for %s, the agent is %s", id, s.SpiffeID)
		}
		sum := sha256.Sum256([]byte(tok))
		c.Token, c.ID, c.Kind, c.ExpiresAt = tok, hex.EncodeToString(sum[:]), KindJWTSVID, exp
	} else {
		exp := now.Add(i.opts.TTL)
		if s.TaskExpires.Before(exp) {
			exp = s.TaskExpires
		}
		exp = exp.Truncate(time.Second)
		var jti [16]byte
		rand.Read(jti[:])
		claims := Claims{
			Claims: jwt.Claims{
				Issuer: i.opts.Issuer, Subject: s.SpiffeID, Audience: jwt.Audience{aud}, ID: hex.EncodeToString(jti[:]),
				IssuedAt: jwt.NewNumericDate(now), NotBefore: jwt.NewNumericDate(now.Add(-5 * time.Second)), Expiry: jwt.NewNumericDate(exp),
			},
			Slot:        s.Slot,
			Task:        TaskClaim{ID: s.TaskID, Type: s.TaskType, Sensitivity: s.Sensitivity, ExpiresAt: s.TaskExpires.Unix()},
			HandoffFrom: s.HandoffFrom,
		}
		signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.EdDSA, Key: i.key}, (&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", i.kid))
		if err != nil {
			return Credential{}, err
		}
		tok, err := jwt.Signed(signer).Claims(claims).Serialize()
		if err != nil {
			return Credential{}, err
		}
		c.Token, c.ID, c.Kind, c.ExpiresAt = tok, claims.ID, KindTether, exp
	}
	i.issueMu.Lock()
	defer i.issueMu.Unlock()
	file, err := i.deliver(s, c.Token)
	if err != nil {
		return Credential{}, err
	}
	c.File = file

	i.mu.Lock()
	defer i.mu.Unlock()
	i.prune(now)
	k := taskKey(s.Slot, s.TaskID)
	t := i.st.Tasks[k]
	if t == nil {
		t = &taskState{Slot: s.Slot, SpiffeID: s.SpiffeID, TaskID: s.TaskID}
		i.st.Tasks[k] = t
	}
	t.Current = c.ID
	t.Issued = append(t.Issued, issued{ID: c.ID, Kind: c.Kind, ExpiresAt: c.ExpiresAt, IssuedAt: now})
	i.save()
	i.opts.Log.Info("task credential issued", "slot", s.Slot, "spiffe_id", s.SpiffeID, "task", s.TaskID, "kind", c.Kind, "id", c.ID, "expires", c.ExpiresAt, "file", file)
	return c, nil
}

// Dir is the directory of the agent in slot.
func (i *Issuer) agentDir(slot dataplane.Slot) string {
	return filepath.Join(i.opts.Dir, "agent-"+strconv.FormatUint(uint64(slot), 10))
}

// Prepare makes the directory of the agent in slot, for uid only, before it has a credential
// (the launcher binds it into a confined agent's view); it returns its path.
func (i *Issuer) Prepare(slot dataplane.Slot, uid uint32) (string, error) {
	dir := i.agentDir(slot)
	if err := os.Mkdir(dir, 0o500); err != nil && !errors.Is(err, os.ErrExist) {
		return "", fmt.Errorf("credential directory of agent %d: %w", slot, err)
	}
	if err := os.Chown(dir, int(uid), -1); err != nil {
		return "", fmt.Errorf("credential directory of agent %d: %w", slot, err)
	}
	if err := os.Chmod(dir, 0o500); err != nil {
		return "", err
	}
	return dir, nil
}

// deliver writes token to the agent's file: a directory and a file only the agent's uid (and
// root) can read, replaced atomically.
func (i *Issuer) deliver(s Subject, token string) (string, error) {
	dir, err := i.Prepare(s.Slot, s.UID)
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, FileName)
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte(token+"\n"), 0o400); err != nil {
		return "", fmt.Errorf("credential file of agent %d: %w", s.Slot, err)
	}
	if err := os.Chown(tmp, int(s.UID), -1); err != nil {
		os.Remove(tmp)
		return "", err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return "", err
	}
	return path, nil
}

// Renew checks that presented is the current credential of s's task (not an earlier one, not
// expired, not revoked) and issues the next one.
func (i *Issuer) Renew(ctx context.Context, s Subject, presented string) (Credential, error) {
	if err := i.Check(s, presented); err != nil {
		return Credential{}, err
	}
	return i.Issue(ctx, s)
}

// Check reports whether presented is the current credential of s's task: not an earlier one
// (ErrReplayed), not expired, not revoked, not another task's or forged (ErrInvalid).
func (i *Issuer) Check(s Subject, presented string) error {
	id, err := i.idOf(presented, s)
	if err != nil {
		return err
	}
	now := i.opts.Now()
	i.mu.Lock()
	t := i.st.Tasks[taskKey(s.Slot, s.TaskID)]
	var err2 error
	switch {
	case i.st.Revoked[id] != nil:
		err2 = fmt.Errorf("%w: %s (%s)", ErrRevoked, id, i.st.Revoked[id].Reason)
	case t == nil:
		err2 = fmt.Errorf("%w: no credential was issued for task %s of agent %d", ErrInvalid, s.TaskID, s.Slot)
	case t.Current != id:
		if j := slices.IndexFunc(t.Issued, func(c issued) bool { return c.ID == id }); j >= 0 {
			err2 = fmt.Errorf("%w: credential %s of task %s was superseded; present the current one", ErrReplayed, id, s.TaskID)
		} else {
			err2 = fmt.Errorf("%w: credential %s was not issued for task %s", ErrInvalid, id, s.TaskID)
		}
	default:
		if j := slices.IndexFunc(t.Issued, func(c issued) bool { return c.ID == id }); j >= 0 && !t.Issued[j].ExpiresAt.After(now) {
			err2 = fmt.Errorf("%w at %s: the task must be started again", ErrExpired, t.Issued[j].ExpiresAt.UTC().Format(time.RFC3339))
		}
	}
	i.mu.Unlock()
	return err2
}

// idOf is the ID of a presented credential, after checking what can be checked: for a tether
// token, its signature, subject, task and expiry.
func (i *Issuer) idOf(token string, s Subject) (string, error) {
	if c, err := i.Verify(token); err == nil || errors.Is(err, ErrExpired) || errors.Is(err, ErrRevoked) {
		if err != nil {
			return "", err
		}
		if c.Subject != s.SpiffeID || c.Task.ID != s.TaskID || c.Slot != s.Slot {
			return "", fmt.Errorf("%w: the credential is for %s task %s (agent %d), not this agent's task %s", ErrInvalid, c.Subject, c.Task.ID, c.Slot, s.TaskID)
		}
		return c.ID, nil
	} else if s.SPIREPID == 0 {
		return "", err
	}
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:]), nil
}

// Verify checks a tether-signed credential: signature, time, revocation. It returns its claims.
func (i *Issuer) Verify(token string) (Claims, error) {
	tok, err := jwt.ParseSigned(token, []jose.SignatureAlgorithm{jose.EdDSA})
	if err != nil {
		return Claims{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	var c Claims
	if err := tok.Claims(i.key.Public(), &c); err != nil {
		return Claims{}, fmt.Errorf("%w: not signed by this tetherd's key: %v", ErrInvalid, err)
	}
	now := i.opts.Now()
	if err := c.ValidateWithLeeway(jwt.Expected{Issuer: i.opts.Issuer, Time: now}, 0); err != nil {
		if errors.Is(err, jwt.ErrExpired) {
			return c, fmt.Errorf("%w at %s", ErrExpired, c.Expiry.Time().UTC().Format(time.RFC3339))
		}
		return c, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	i.mu.Lock()
	r := i.st.Revoked[c.ID]
	i.mu.Unlock()
	if r != nil {
		return c, fmt.Errorf("%w at %s: %s", ErrRevoked, r.RevokedAt.UTC().Format(time.RFC3339), r.Reason)
	}
	return c, nil
}

// Revoke ends the credentials of a task: every one that has not expired (or did so within Skew)
// goes on the revocation list, and the agent's file is removed unless it already holds a later
// task's credential (a task's end is told from a goroutine of its own, so the agent's next task
// may have been issued one in between).
func (i *Issuer) Revoke(slot dataplane.Slot, taskID, reason string) {
	now := i.opts.Now()
	i.mu.Lock()
	defer i.mu.Unlock()
	k := taskKey(slot, taskID)
	t := i.st.Tasks[k]
	if t == nil {
		return
	}
	for _, c := range t.Issued {
		if c.ExpiresAt.Add(Skew).After(now) {
			i.st.Revoked[c.ID] = &Revocation{ID: c.ID, Kind: c.Kind, SpiffeID: t.SpiffeID, TaskID: taskID, Reason: reason, RevokedAt: now, ExpiresAt: c.ExpiresAt}
		}
	}
	delete(i.st.Tasks, k)
	i.prune(now)
	i.save()
	if !i.slotHasTask(slot) {
		if err := os.Remove(filepath.Join(i.agentDir(slot), FileName)); err != nil && !errors.Is(err, os.ErrNotExist) {
			i.opts.Log.Error("removing a revoked credential file", "slot", slot, "error", err)
		}
	}
	i.opts.Log.Info("task credentials revoked", "slot", slot, "spiffe_id", t.SpiffeID, "task", taskID, "reason", reason)
}

// slotHasTask says whether some task of the agent in slot holds credentials. Call with i.mu held.
func (i *Issuer) slotHasTask(slot dataplane.Slot) bool {
	for _, t := range i.st.Tasks {
		if t.Slot == slot {
			return true
		}
	}
	return false
}

// Forget removes the agent's directory (the agent is gone; its tasks were revoked).
func (i *Issuer) Forget(slot dataplane.Slot) {
	os.RemoveAll(i.agentDir(slot))
}

// Current returns the current credential ID of a task, if any.
func (i *Issuer) Current(slot dataplane.Slot, taskID string) (string, bool) {
	i.mu.Lock()
	defer i.mu.Unlock()
	t := i.st.Tasks[taskKey(slot, taskID)]
	if t == nil {
		return "", false
	}
	return t.Current, true
}

// Revoked is the revocation list: revoked credentials until Skew after they expire.
func (i *Issuer) Revoked() []Revocation {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.prune(i.opts.Now())
	out := make([]Revocation, 0, len(i.st.Revoked))
	for _, r := range i.st.Revoked {
		out = append(out, *r)
	}
	slices.SortFunc(out, func(a, b Revocation) int { return a.RevokedAt.Compare(b.RevokedAt) })
	return out
}

// Keys is the public key set relying parties verify tether's credentials with.
func (i *Issuer) Keys() jose.JSONWebKeySet {
	return jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: i.key.Public(), KeyID: i.kid, Algorithm: string(jose.EdDSA), Use: "sig"}}}
}
