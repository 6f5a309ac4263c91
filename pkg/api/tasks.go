package api

import (
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/confine"
)

// An agent's task and what its launcher does for it: start, renew, end, approvals, the task
// credential and its heartbeat, handoff, the confinement plan and the refusals it reports.

func taskSpec(t TaskRequest) (agents.TaskSpec, error) {
	ttl, err := time.ParseDuration(t.TTL)
	if err != nil {
		return agents.TaskSpec{}, badRequest(fmt.Errorf("task ttl %q: %w", t.TTL, err))
	}
	return agents.TaskSpec{ID: t.ID, Type: t.Type, Sensitivity: t.Sensitivity, TTL: ttl}, nil
}

func (s *Server) startTask(c *request, req TaskRequest) (any, error) {
	spec, err := taskSpec(req)
	if err != nil {
		return nil, err
	}
	return s.svc.Agents.StartTask(c.slot, spec)
}

func (s *Server) renewTask(c *request, req RenewRequest) (any, error) {
	ttl, err := ttlOf(req.TTL)
	if err != nil {
		return nil, err
	}
	return s.svc.Agents.RenewTask(c.slot, ttl)
}

func (s *Server) endTask(c *request) (any, error) { return s.svc.Agents.EndTask(c.slot) }

func (s *Server) addApproval(c *request, req ApprovalRequest) (any, error) {
	ttl, err := ttlOf(req.TTL)
	if err != nil {
		return nil, err
	}
	s.log.Info("API approval", "slot", c.slot, "action", req.Action, "resource", req.Resource, "uses", req.Uses, "by", c.by())
	return s.svc.Agents.AddApproval(c.slot, req.Action, req.Resource, c.by(), ttl, req.Uses)
}

func (s *Server) taskCredential(c *request) (any, error) {
	return s.svc.Credentials.TaskCredential(c.slot)
}

// confinement is what tetherctl run does to a launched agent: its launcher (or an admin) asks
// for it between registering the agent and starting its command. An unconfined agent (the
// policy says sandbox: off, or ?keep_caps=true for a root agent) needs a launch rule with
// unconfined: true.
func (s *Server) confinement(c *request) (any, error) {
	plan, err := s.svc.Agents.Confinement(c.slot)
	if err != nil {
		return nil, err
	}
	if c.r.URL.Query().Get("keep_caps") == "true" {
		if plan.UID != 0 {
			return nil, badRequest(errors.New("--keep-caps is for agents running as root (--allow-root)"))
		}
		plan.KeepCaps = true
	}
	if (plan.Profile == confine.Off || plan.KeepCaps) && !s.policy().MayLaunchUnconfined(c.caller, c.agent.SpiffeID) {
		why := "the policy's grants say sandbox: off"
		if plan.KeepCaps {
			why = "--keep-caps asks for it"
		}
		return nil, forbidden(fmt.Errorf("agent %d (%s) would run unconfined (%s), and no launch rule with unconfined: true lets uid %d launch it",
			c.slot, c.agent.SpiffeID, why, c.caller.UID))
	}
	return plan, nil
}

// refusal records a system call the launcher's seccomp filter refused to its agent (the launcher
// answers the filter's notifications and reports them here).
func (s *Server) refusal(c *request, req RefusalRequest) (any, error) {
	if err := req.check(); err != nil {
		return nil, badRequest(err)
	}
	return nil, s.svc.Agents.RecordRefusal(c.slot, req.PID, req.Syscall, req.Detail, req.Errno)
}

// heartbeat renews the task for the launcher, which presents the task's current credential and
// gets the next one. On the agent socket the agent renews its own (AgentServer.renew).
func (s *Server) heartbeat(c *request, req HeartbeatRequest) (any, error) {
	return heartbeat(s.router, c, req, "heartbeat", "a heartbeat presents the task's current credential")
}

// heartbeat is a renewal presenting the task's current credential, on either socket.
func heartbeat(rt router, c *request, req HeartbeatRequest, what, needs string) (any, error) {
	ttl, err := ttlOf(req.TTL)
	if err != nil {
		return nil, err
	}
	if req.Credential == "" {
		return nil, badRequest(errors.New("credential is required: " + needs))
	}
	cred, err := rt.svc.Credentials.Heartbeat(c.r.Context(), c.slot, req.Credential, ttl)
	if err != nil {
		rt.log.Warn(what+" refused", "slot", c.slot, "caller_uid", c.caller.UID, "error", err)
		return nil, err
	}
	return cred, nil
}

// handoff hands the agent's task to another agent: the sender's launcher (presenting the
// sender's current credential) or an admin may ask, and must be the receiver's launcher too
// unless an admin.
func (s *Server) handoff(c *request, req HandoffRequest) (any, error) {
	ttl, err := ttlOf(req.TTL)
	if err != nil {
		return nil, err
	}
	if req.Credential == "" {
		return nil, badRequest(errors.New("credential is required: the sender's current task credential"))
	}
	to, found := s.svc.Agents.Get(req.To)
	if !found {
		return nil, withStatus(http.StatusNotFound, fmt.Errorf("no agent in slot %d (receiver)", req.To))
	}
	if !launched(to, c.caller) && !s.policy().IsAdmin(c.caller) {
		return nil, forbidden(fmt.Errorf("uid %d neither launched agent %d nor is an admin", c.caller.UID, req.To))
	}
	got, cred, err := s.svc.Agents.Handoff(c.r.Context(), c.slot, to.Slot, req.Credential, agents.HandoffSpec{Type: req.Type, TTL: ttl})
	if err != nil {
		s.log.Warn("handoff refused", "from", c.slot, "to", req.To, "caller_uid", c.caller.UID, "error", err)
		return nil, err
	}
	return HandoffResult{Agent: got, Credential: cred}, nil
}
