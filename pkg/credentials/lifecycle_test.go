package credentials

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
)

type fakeTasks struct {
	a       agents.Agent
	renewed int
}

func (f *fakeTasks) Get(slot dataplane.Slot) (agents.Agent, bool) { return f.a, slot == f.a.Slot }

func (f *fakeTasks) RenewTask(slot dataplane.Slot, ttl time.Duration) (agents.Agent, error) {
	f.renewed++
	t := *f.a.Task
	t.ExpiresAt = t.ExpiresAt.Add(ttl)
	f.a.Task = &t
	return f.a, nil
}

// TestLifecycleRenewsOnlyForTheCurrentCredential: a heartbeat with the current credential renews
// the task and issues the next one; one with an earlier credential renews nothing; an ended task
// has no credential.
func TestLifecycleRenewsOnlyForTheCurrentCredential(t *testing.T) {
	c := &clock{time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)}
	l := NewLifecycle(newIssuer(t, t.TempDir(), c), nil)
	task := &agents.Task{TaskInfo: agents.TaskInfo{ID: "task-1", Type: "coding", ExpiresAt: c.t.Add(time.Hour)}}
	tasks := &fakeTasks{a: agents.Agent{Slot: 3, SpiffeID: "spiffe://x.org/agent", UID: uint32(os.Getuid()), Task: task}}
	l.Tasks = tasks
	ctx := context.Background()

	first, err := l.IssueFor(ctx, tasks.a)
	if err != nil {
		t.Fatal(err)
	}
	next, err := l.Heartbeat(ctx, 3, first.Token, time.Hour)
	if err != nil || tasks.renewed != 1 {
		t.Fatalf("heartbeat with the current credential: %v (renewed %d times)", err, tasks.renewed)
	}
	if _, err := l.Heartbeat(ctx, 3, first.Token, time.Hour); !errors.Is(err, ErrReplayed) || tasks.renewed != 1 {
		t.Errorf("heartbeat with the earlier credential: %v (renewed %d times, want 1)", err, tasks.renewed)
	}
	if got, err := l.TaskCredential(3); err != nil || got.ID != next.ID {
		t.Errorf("current credential %+v %v, want %s", got, err, next.ID)
	}
	l.Ended(3, tasks.a.SpiffeID, *tasks.a.Task, "task ended")
	if _, err := l.TaskCredential(3); !errors.Is(err, agents.ErrTask) {
		t.Errorf("credential of an ended task: %v", err)
	}
	if _, err := l.TaskCredential(4); !errors.Is(err, agents.ErrNotFound) {
		t.Errorf("credential of no agent: %v", err)
	}
}
