package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/identity"
	"github.com/tether-sh/tether/pkg/stepup"
)

// newTaskCreds sets up the task credentials' lifecycle: a tmpfs for the agents' files, the
// issuer (its key, SPIRE's JWT-SVIDs where the agent has a SPIRE identity).
func newTaskCreds(cfg config.Credentials, node string, spire *identity.SPIRE, log *slog.Logger) (*credentials.Lifecycle, error) {
	if err := credentials.MountTmpfs(cfg.Dir); err != nil {
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
	return credentials.NewLifecycle(iss, log), nil
}

// Heartbeat renews the agent's task for ttl against its current credential (see
// credentials.Lifecycle.Heartbeat).
func (d *Daemon) Heartbeat(ctx context.Context, slot dataplane.Slot, presented string, ttl time.Duration) (credentials.Credential, error) {
	return d.creds.Heartbeat(ctx, slot, presented, ttl)
}

// TaskCredential is the current credential of the agent's task.
func (d *Daemon) TaskCredential(slot dataplane.Slot) (credentials.Credential, error) {
	return d.creds.TaskCredential(slot)
}

func (d *Daemon) CredentialKeys() jose.JSONWebKeySet { return d.creds.Keys() }

func (d *Daemon) RevokedCredentials() []credentials.Revocation { return d.creds.Revoked() }

func (d *Daemon) VerifyCredential(token string) (credentials.Claims, error) {
	return d.creds.Verify(token)
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
	if err := d.creds.CheckAgent(sender, presented); err != nil {
		return agents.Agent{}, credentials.Credential{}, fmt.Errorf("the sender's credential: %w", err)
	}
	dec, err := d.pol.decider.Stepup(ctx, from, "handoff", receiver.SpiffeID, "handoff of task "+sender.Task.ID)
	if err != nil {
		return agents.Agent{}, credentials.Credential{}, err
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
	cred, err := d.creds.IssueFor(ctx, a)
	if err != nil {
		return a, credentials.Credential{}, fmt.Errorf("task handed over, but its credential was not issued: %w", err)
	}
	d.log.Info("handoff", "from_slot", from, "from", sender.SpiffeID, "from_task", sender.Task.ID, "to_slot", to, "to", a.SpiffeID, "task", a.Task.ID, "credential", cred.ID)
	return a, cred, nil
}
