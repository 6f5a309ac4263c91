package agents

import (
	"fmt"
	"math"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/grants"
)

// Counted grants. Every approval is a counted grant in the kernel: its uses (or, without a use
// count, as many as come) until it expires. The rules the policy says hold by the approval
// (grants.Egress.Approval) name the grant, and the kernel takes a use for each connect they
// allow, so the (N+1)th is denied however slow tetherd is. Uses count connects, not time: a
// connection a use opened lives until the approval ends (or its rule's max_duration), and is
// terminated then. An approval used up stays until it expires, so that the next denied attempt
// does not end the connections it opened. The registry numbers the grants and clears each when
// its approval ends (expired, task ended, agent gone).

// grantPool hands out the kernel's grant numbers (1 to MaxGrants-1). Guarded by Registry.mu.
type grantPool struct {
	used [dataplane.MaxGrants]bool
	next uint32
}

func (p *grantPool) take() (uint32, bool) {
	for range dataplane.MaxGrants {
		p.next = p.next%(dataplane.MaxGrants-1) + 1
		if !p.used[p.next] {
			p.used[p.next] = true
			return p.next, true
		}
	}
	return 0, false
}

func (p *grantPool) give(i uint32) {
	if i > 0 && i < dataplane.MaxGrants {
		p.used[i] = false
	}
}

// openGrant puts an approval's counted grant in force and returns its number. Call with r.mu
// held.
func (r *Registry) openGrant(uses int64, expires time.Time) (uint32, error) {
	i, ok := r.grants.take()
	if !ok {
		return 0, fmt.Errorf("%w: all %d counted grants are in use: end tasks or let approvals expire", ErrTask, dataplane.MaxGrants-1)
	}
	left := uses
	if left == 0 {
		left = math.MaxInt64 // bounded by the expiry only
	}
	if err := r.write("writing a counted grant", func() error { return r.opts.Dataplane.SetGrant(i, left, expires) }); err != nil {
		r.grants.give(i)
		return 0, err
	}
	return i, nil
}

// closeGrants ends the counted grants of approvals. Call with r.mu held.
func (r *Registry) closeGrants(aps []Approval) {
	for _, ap := range aps {
		if ap.Grant == 0 {
			continue
		}
		if err := r.write("clearing a counted grant", func() error { return r.opts.Dataplane.ClearGrant(ap.Grant) }); err != nil {
			// The rules naming it are gone with the next install; the number is not reused
			// while the kernel may still count on it.
			r.log.Error("counted grant left in the kernel", "grant", ap.Grant, "approval", ap.ID, "error", err)
			continue
		}
		r.grants.give(ap.Grant)
	}
}

// dropTask ends a's task and the counted grants of its approvals. Call with r.mu held.
func (r *Registry) dropTask(a *agent, reason string) {
	r.taskEnded(a, reason)
	if a.ctx.Task != nil {
		r.closeGrants(a.ctx.Task.Approvals)
	}
	a.ctx.Task, a.ceiling = nil, nil
}

// counted gives the rules that hold by an approval its counted grant. A rule naming an approval
// the task does not have keeps no grant, and the compiler refuses it. g is changed in place (its
// egress slice is its own: the evaluator's answer).
func counted(g *grants.Grants, t *Task) {
	for i, e := range g.Egress {
		if e.Approval == "" {
			continue
		}
		g.Egress[i].Grant = 0
		if t == nil {
			continue
		}
		for _, ap := range t.Approvals {
			if ap.ID == e.Approval {
				g.Egress[i].Grant = ap.Grant
			}
		}
	}
}
