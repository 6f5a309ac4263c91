package credentials

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

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// Tasks is what a Lifecycle needs of the agents' registry.
type Tasks interface {
	Get(slot dataplane.Slot) (agents.Agent, bool)
	RenewTask(slot dataplane.Slot, ttl time.Duration) (agents.Agent, error)
}

// Lifecycle issues, renews and revokes the agents' task credentials as their tasks start, get
// heartbeats and end, and serves relying parties the key set and the revocation list.
type Lifecycle struct {
	*Issuer
	// Tasks is the registry; set before the first heartbeat (the registry is built with the
	// lifecycle's Ended and Unregistered).
	Tasks Tasks
	log   *slog.Logger

	mu      sync.Mutex
	current map[dataplane.Slot]Credential // the last one issued for the agent's task
}

// NewLifecycle returns the lifecycle of iss's credentials.
func NewLifecycle(iss *Issuer, log *slog.Logger) *Lifecycle {
	return &Lifecycle{Issuer: iss, log: log, current: map[dataplane.Slot]Credential{}}
}

// MountTmpfs mounts a tmpfs of its own at dir unless dir is on a tmpfs already: its own from
// before a restart (the credentials in it stay current), or one such as /run. Under systemd with
// ProtectSystem, or in a pod, a mount tetherd makes stays in its own mount namespace, hidden
// from the agents; files written to the host's /run are not.
func MountTmpfs(dir string) error {
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

// SubjectOf is the credential subject of agent a's task.
func SubjectOf(a agents.Agent) (Subject, error) {
	if a.Task == nil {
		return Subject{}, fmt.Errorf("%w: agent %d has no task", agents.ErrTask, a.Slot)
	}
	s := Subject{Slot: a.Slot, SpiffeID: a.SpiffeID, UID: a.UID, TaskID: a.Task.ID, TaskType: a.Task.Type,
		Sensitivity: a.Task.Sensitivity, TaskExpires: a.Task.ExpiresAt, HandoffFrom: a.Task.HandoffFrom}
	for _, sel := range a.Selectors {
		if rest, ok := strings.CutPrefix(sel, "spire:pid:"); ok {
			fmt.Sscan(rest, &s.SPIREPID)
		}
	}
	return s, nil
}

// IssueFor gives agent a's task a credential.
func (l *Lifecycle) IssueFor(ctx context.Context, a agents.Agent) (Credential, error) {
	s, err := SubjectOf(a)
	if err != nil {
		return Credential{}, err
	}
	cred, err := l.Issue(ctx, s)
	if err != nil {
		return Credential{}, err
	}
	l.setCurrent(a.Slot, cred)
	return cred, nil
}

func (l *Lifecycle) setCurrent(slot dataplane.Slot, cred Credential) {
	l.mu.Lock()
	l.current[slot] = cred
	l.mu.Unlock()
}

// CheckAgent reports whether presented is the current credential of agent a's task.
func (l *Lifecycle) CheckAgent(a agents.Agent, presented string) error {
	s, err := SubjectOf(a)
	if err != nil {
		return err
	}
	return l.Check(s, presented)
}

// TaskCredential is the current credential of the task of the agent in slot.
func (l *Lifecycle) TaskCredential(slot dataplane.Slot) (Credential, error) {
	l.mu.Lock()
	cred, ok := l.current[slot]
	l.mu.Unlock()
	if ok {
		return cred, nil
	}
	if _, ok := l.Tasks.Get(slot); !ok {
		return Credential{}, fmt.Errorf("%w: slot %d", agents.ErrNotFound, slot)
	}
	return Credential{}, fmt.Errorf("%w: agent %d has no task credential (no task, or it ended)", agents.ErrTask, slot)
}

// Ended revokes the credentials of a task that ended (the registry's TaskEnded).
func (l *Lifecycle) Ended(slot dataplane.Slot, id string, t agents.Task, reason string) {
	l.Revoke(slot, t.ID, reason)
	l.mu.Lock()
	if cur, ok := l.current[slot]; ok && cur.TaskID == t.ID {
		delete(l.current, slot)
	}
	l.mu.Unlock()
}

// Unregistered removes the directory of an agent that is gone (the registry's Unregistered).
func (l *Lifecycle) Unregistered(slot dataplane.Slot) { l.Forget(slot) }

// Heartbeat renews agent slot's task for ttl, if presented is its current credential, and
// issues the next credential. An old, expired, revoked or foreign credential renews nothing.
func (l *Lifecycle) Heartbeat(ctx context.Context, slot dataplane.Slot, presented string, ttl time.Duration) (Credential, error) {
	a, ok := l.Tasks.Get(slot)
	if !ok {
		return Credential{}, fmt.Errorf("%w: slot %d", agents.ErrNotFound, slot)
	}
	// Checked before the task is renewed: a replayed credential must not keep a task alive.
	if err := l.CheckAgent(a, presented); err != nil {
		return Credential{}, err
	}
	a, err := l.Tasks.RenewTask(slot, ttl)
	if err != nil {
		return Credential{}, err
	}
	s, err := SubjectOf(a)
	if err != nil {
		return Credential{}, err
	}
	cred, err := l.Renew(ctx, s, presented)
	if err != nil {
		return Credential{}, err
	}
	l.setCurrent(slot, cred)
	return cred, nil
}

// ServeRelyingParties serves the key set (/keys) and the revocation list (/revoked) over HTTP
// at addr; it returns what stops it.
func (l *Lifecycle) ServeRelyingParties(addr string) (func(), error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("credentials.listen: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /keys", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, l.Keys()) })
	mux.HandleFunc("GET /revoked", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, l.Revoked()) })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			l.log.Error("serving credentials.listen", "error", err)
		}
	}()
	l.log.Info("serving the credential key set and revocation list", "address", ln.Addr().String())
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}, nil
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}
