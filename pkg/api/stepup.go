package api

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// Step-up approvals on the admin socket: list, approve once, deny.

func (s *Server) approvals(*request) (any, error) { return s.svc.Stepups.List(nil), nil }

func (s *Server) approve(c *request, req ApproveRequest) (any, error) {
	var ttl time.Duration
	if req.TTL != "" {
		var err error
		if ttl, err = ttlOf(req.TTL); err != nil {
			return nil, err
		}
	}
	return s.svc.Stepups.Approve(c.r.PathValue("id"), c.by(), req.Uses, ttl)
}

func (s *Server) deny(c *request, req DenyRequest) (any, error) {
	return s.svc.Stepups.Deny(c.r.PathValue("id"), c.by(), req.Why)
}

// AgentServer serves the agent socket: the verbs an agent may use on itself (its status, its
// task's renewal and end, step-up requests). Who calls is the agent whose cgroup holds the
// connecting process (SO_PEERCRED, checked against its pidfd), never what the request says;
// processes outside agents are refused.
type AgentServer struct {
	router
	agentOf func(pid int32) (dataplane.Slot, bool)
	srv     *http.Server
}

// NewAgentServer returns the agent socket's server; agentOf finds the agent of a process.
func NewAgentServer(svc Backend, agentOf func(pid int32) (dataplane.Slot, bool), log *slog.Logger) *AgentServer {
	s := &AgentServer{router: router{svc: svc, log: log}, agentOf: agentOf}
	s.srv = socketServer(s.guard(s.mux(s.routes())), log)
	return s
}

// routes is the agent socket's table: every verb is about the caller's own agent.
func (s *AgentServer) routes() []route {
	return []route{
		{pattern: "GET /v1/self", access: self, serve: s.self},
		{pattern: "PUT /v1/self/task", access: self, serve: withBody(s.renew)},
		{pattern: "DELETE /v1/self/task", access: self, serve: s.end},
		{pattern: "POST /v1/self/stepup", access: self, serve: withBody(s.request)},
		{pattern: "GET /v1/self/stepup", access: self, serve: s.requests},
	}
}

// Serve serves l until Shutdown.
func (s *AgentServer) Serve(l net.Listener) error {
	if err := s.srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Shutdown stops serving.
func (s *AgentServer) Shutdown(ctx context.Context) error { return s.srv.Shutdown(ctx) }

type slotKey struct{}

// guard lets through only processes inside an agent, and names the agent for the handlers.
func (s *AgentServer) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, ok := knownCaller(w, r)
		if !ok {
			return
		}
		// One look at the peer: the agent of its pid, and (its pidfd) whether that process is
		// still the caller; confined reports only the latter when the lookup answers false.
		var slot dataplane.Slot
		found := false
		gone := confined(r, c, func(pid int32) bool {
			slot, found = s.agentOf(pid)
			return false
		})
		if !found || gone {
			refuse(w, http.StatusForbidden, errors.New("only processes inside an agent use the agent socket (admins: the API socket)"))
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), slotKey{}, slot)))
	})
}

func selfSlot(r *http.Request) dataplane.Slot { return r.Context().Value(slotKey{}).(dataplane.Slot) }

func (s *AgentServer) self(c *request) (any, error) {
	a, ok := s.svc.Agents.Get(c.slot)
	if !ok {
		return nil, withStatus(http.StatusNotFound, errors.New("the caller's agent is gone"))
	}
	return a, nil
}

// renew renews the agent's task as a heartbeat does: the agent presents its task's current
// credential (the file TETHER_TASK_CREDENTIAL_FILE names) and gets the next one; the task never
// lives past its NotAfter.
func (s *AgentServer) renew(c *request, req HeartbeatRequest) (any, error) {
	return heartbeat(s.router, c, req, "renewal", "a renewal presents the task's current credential")
}

func (s *AgentServer) end(c *request) (any, error) { return s.svc.Agents.EndTask(c.slot) }

func (s *AgentServer) request(c *request, req StepupRequest) (any, error) {
	s.log.Info("step-up request", "slot", c.slot, "action", req.Action, "resource", req.Resource)
	return s.svc.Stepups.Request(c.r.Context(), c.slot, req.Action, req.Resource, req.Reason)
}

func (s *AgentServer) requests(c *request) (any, error) {
	return s.svc.Stepups.List(&c.slot), nil
}
