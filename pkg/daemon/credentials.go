package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/identity"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/pkg/stepup"
)

// taskCreds issues, renews and revokes the agents' task credentials (pkg/credentials) as their
// tasks start, get heartbeats and end.
type taskCreds struct {
	iss *credentials.Issuer

	mu      sync.Mutex
	current map[dataplane.Slot]credentials.Credential // the last one issued for the agent's task
}

// mountTmpfs mounts a tmpfs of its own at dir unless dir is on a tmpfs already: its own from
// before a restart (the credentials in it stay current), or one such as /run. Under systemd with
// ProtectSystem, or in a pod, a mount tetherd makes stays in its own mount namespace, hidden
// from the agents; files written to the host's /run are not.
func mountTmpfs(dir string) error {
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return fmt.Errorf("credential directory: %w", err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return err
	}
	if fs.Type == unix.TMPFS_MAGIC {
		return nil
	}
	if err := unix.Mount("tether-credentials", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0711,size=16m"); err != nil {
		return fmt.Errorf("mounting a tmpfs for credentials at %s: %w", dir, err)
	}
	return nil
}

func newTaskCreds(cfg config.Credentials, node string, spire *identity.SPIRE, log *slog.Logger) (*taskCreds, error) {
	if err := mountTmpfs(cfg.Dir); err != nil {
		return nil, err
	}
	opts := credentials.Options{KeyFile: cfg.KeyFile, Dir: cfg.Dir, Issuer: "tether://" + node, TTL: cfg.TTL, Log: log}
	if spire != nil {
		opts.SPIRE = spire // a nil *SPIRE in the interface would not be nil
	}
	iss, err := credentials.New(opts)
	if err != nil {
		return nil, err
	}
	return &taskCreds{iss: iss, current: map[dataplane.Slot]credentials.Credential{}}, nil
}

// subject is the credential subject of agent a's task.
func subject(a agents.Agent) (credentials.Subject, error) {
	if a.Task == nil {
		return credentials.Subject{}, fmt.Errorf("%w: agent %d has no task", agents.ErrTask, a.Slot)
	}
	s := credentials.Subject{Slot: a.Slot, SpiffeID: a.SpiffeID, UID: a.UID, TaskID: a.Task.ID, TaskType: a.Task.Type,
		Sensitivity: a.Task.Sensitivity, TaskExpires: a.Task.ExpiresAt, HandoffFrom: a.Task.HandoffFrom}
	for _, sel := range a.Selectors {
		if rest, ok := strings.CutPrefix(sel, "spire:pid:"); ok {
			fmt.Sscan(rest, &s.SPIREPID)
		}
	}
	return s, nil
}

// issue gives agent a's task a credential.
func (c *taskCreds) issue(ctx context.Context, a agents.Agent) (credentials.Credential, error) {
	s, err := subject(a)
	if err != nil {
		return credentials.Credential{}, err
	}
	cred, err := c.iss.Issue(ctx, s)
	if err != nil {
		return credentials.Credential{}, err
	}
	c.mu.Lock()
	c.current[a.Slot] = cred
	c.mu.Unlock()
	return cred, nil
}

// get is the agent's current credential.
func (c *taskCreds) get(slot dataplane.Slot) (credentials.Credential, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cred, ok := c.current[slot]
	return cred, ok
}

// ended revokes the credentials of a task that ended.
func (c *taskCreds) ended(slot dataplane.Slot, id string, t agents.Task, reason string) {
	c.iss.Revoke(slot, t.ID, reason)
	c.mu.Lock()
	if cur, ok := c.current[slot]; ok && cur.TaskID == t.ID {
		delete(c.current, slot)
	}
	c.mu.Unlock()
}

// unregistered removes the directory of an agent that is gone.
func (c *taskCreds) unregistered(slot dataplane.Slot) { c.iss.Forget(slot) }

// heartbeat renews agent slot's task for ttl, if presented is its current credential, and
// issues the next credential. An old, expired, revoked or foreign credential renews nothing.
func (d *Daemon) Heartbeat(ctx context.Context, slot dataplane.Slot, presented string, ttl time.Duration) (credentials.Credential, error) {
	a, ok := d.registry.Get(slot)
	if !ok {
		return credentials.Credential{}, fmt.Errorf("%w: slot %d", agents.ErrNotFound, slot)
	}
	s, err := subject(a)
	if err != nil {
		return credentials.Credential{}, err
	}
	// Checked before the task is renewed: a replayed credential must not keep a task alive.
	if err := d.creds.iss.Check(s, presented); err != nil {
		return credentials.Credential{}, err
	}
	if a, err = d.registry.RenewTask(slot, ttl); err != nil {
		return credentials.Credential{}, err
	}
	if s, err = subject(a); err != nil {
		return credentials.Credential{}, err
	}
	cred, err := d.creds.iss.Renew(ctx, s, presented)
	if err != nil {
		return credentials.Credential{}, err
	}
	d.creds.mu.Lock()
	d.creds.current[slot] = cred
	d.creds.mu.Unlock()
	return cred, nil
}

// TaskCredential is the current credential of the agent's task.
func (d *Daemon) TaskCredential(slot dataplane.Slot) (credentials.Credential, error) {
	if cred, ok := d.creds.get(slot); ok {
		return cred, nil
	}
	if _, ok := d.registry.Get(slot); !ok {
		return credentials.Credential{}, fmt.Errorf("%w: slot %d", agents.ErrNotFound, slot)
	}
	return credentials.Credential{}, fmt.Errorf("%w: agent %d has no task credential (no task, or it ended)", agents.ErrTask, slot)
}

func (d *Daemon) CredentialKeys() jose.JSONWebKeySet { return d.creds.iss.Keys() }

func (d *Daemon) RevokedCredentials() []credentials.Revocation { return d.creds.iss.Revoked() }

func (d *Daemon) VerifyCredential(token string) (credentials.Claims, error) {
	return d.creds.iss.Verify(token)
}

// serveRelyingParties serves the key set and the revocation list over HTTP at addr.
func (d *Daemon) serveRelyingParties(ctx context.Context, addr string) (func(), error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("credentials.listen: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /keys", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, d.CredentialKeys()) })
	mux.HandleFunc("GET /revoked", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, d.RevokedCredentials()) })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("serving credentials.listen", "error", err)
		}
	}()
	d.log.Info("serving the credential key set and revocation list", "address", l.Addr().String())
	return func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}, nil
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

// Handoff hands agent from's task (or a part of it) to agent to. The caller presents the
// sender's current task credential; the policy must allow the handoff (data.tether.stepup with
// action "handoff" and the receiver's SPIFFE ID as resource, for the sender's context); the
// receiver then gets a task derived from the sender's, a credential for it, and grants that are at
// most what the sender has. Both identities are in the log.
func (d *Daemon) Handoff(ctx context.Context, from, to dataplane.Slot, presented string, spec agents.HandoffSpec) (agents.Agent, credentials.Credential, error) {
	sender, ok := d.registry.Get(from)
	if !ok {
		return agents.Agent{}, credentials.Credential{}, fmt.Errorf("%w: slot %d (sender)", agents.ErrNotFound, from)
	}
	receiver, ok := d.registry.Get(to)
	if !ok {
		return agents.Agent{}, credentials.Credential{}, fmt.Errorf("%w: slot %d (receiver)", agents.ErrNotFound, to)
	}
	s, err := subject(sender)
	if err != nil {
		return agents.Agent{}, credentials.Credential{}, err
	}
	if err := d.creds.iss.Check(s, presented); err != nil {
		return agents.Agent{}, credentials.Credential{}, fmt.Errorf("the sender's credential: %w", err)
	}
	rev := d.pol.engine.Current()
	c, ok := d.registry.ContextOf(from)
	if rev == nil || !ok {
		return agents.Agent{}, credentials.Credential{}, errors.New("no policy revision is in force")
	}
	in := d.input(c)
	in.Request = &policy.Request{Action: "handoff", Resource: receiver.SpiffeID, Reason: "handoff of task " + sender.Task.ID}
	dec, err := rev.Stepup(ctx, in)
	if err != nil {
		return agents.Agent{}, credentials.Credential{}, fmt.Errorf("asking the policy: %w", err)
	}
	if !dec.Allowed || dec.NeedsApproval {
		d.log.Warn("handoff refused", "from", sender.SpiffeID, "to", receiver.SpiffeID, "task", sender.Task.ID, "reason", dec.Reason)
		return agents.Agent{}, credentials.Credential{}, fmt.Errorf("%w: the policy does not allow %s to hand task %s to %s: %s",
			stepup.ErrRefused, sender.SpiffeID, sender.Task.ID, receiver.SpiffeID, dec.Reason)
	}
	a, err := d.registry.Handoff(from, to, spec)
	if err != nil {
		return a, credentials.Credential{}, err
	}
	cred, err := d.creds.issue(ctx, a)
	if err != nil {
		return a, credentials.Credential{}, fmt.Errorf("task handed over, but its credential was not issued: %w", err)
	}
	d.log.Info("handoff", "from_slot", from, "from", sender.SpiffeID, "from_task", sender.Task.ID, "to_slot", to, "to", a.SpiffeID, "task", a.Task.ID, "credential", cred.ID)
	return a, cred, nil
}
