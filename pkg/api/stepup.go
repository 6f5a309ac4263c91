package api

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/stepup"
)

// Step-up approvals on the admin socket: list, approve once, deny.

func (s *Server) approvals(w http.ResponseWriter, r *http.Request) {
	if !s.admin(w, r) {
		return
	}
	reply(w, http.StatusOK, s.svc.Stepups(nil))
}

func (s *Server) approve(w http.ResponseWriter, r *http.Request) {
	if !s.admin(w, r) {
		return
	}
	var req ApproveRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	var ttl time.Duration
	if req.TTL != "" {
		var ok bool
		if ttl, ok = ttlOf(w, req.TTL); !ok {
			return
		}
	}
	by := fmt.Sprintf("uid:%d", caller(r).UID)
	stepupResult(w, func() (stepup.Request, error) { return s.svc.ApproveStepup(r.PathValue("id"), by, req.Uses, ttl) })
}

func (s *Server) deny(w http.ResponseWriter, r *http.Request) {
	if !s.admin(w, r) {
		return
	}
	var req DenyRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	by := fmt.Sprintf("uid:%d", caller(r).UID)
	stepupResult(w, func() (stepup.Request, error) { return s.svc.DenyStepup(r.PathValue("id"), by, req.Why) })
}

// stepupResult answers with the request f returns, or with why it failed.
func stepupResult(w http.ResponseWriter, f func() (stepup.Request, error)) {
	req, err := f()
	switch {
	case errors.Is(err, stepup.ErrNotFound), errors.Is(err, agents.ErrNotFound):
		refuse(w, http.StatusNotFound, err)
	case errors.Is(err, stepup.ErrDecided), errors.Is(err, agents.ErrTask):
		refuse(w, http.StatusConflict, err)
	case errors.Is(err, agents.ErrInvalid):
		refuse(w, http.StatusBadRequest, err)
	case errors.Is(err, ErrRefused):
		refuse(w, http.StatusForbidden, err)
	case err != nil:
		refuse(w, http.StatusInternalServerError, err)
	default:
		reply(w, http.StatusOK, req)
	}
}

// AgentServer serves the agent socket: the verbs an agent may use on itself (its status, its
// task's renewal and end, step-up requests). Who calls is the agent whose cgroup holds the
// connecting process (SO_PEERCRED, checked against its pidfd), never what the request says;
// processes outside agents are refused.
type AgentServer struct {
	svc     Service
	agentOf func(pid int32) (dataplane.Slot, bool)
	log     *slog.Logger
	srv     *http.Server
}

// NewAgentServer returns the agent socket's server; agentOf finds the agent of a process.
func NewAgentServer(svc Service, agentOf func(pid int32) (dataplane.Slot, bool), log *slog.Logger) *AgentServer {
	s := &AgentServer{svc: svc, agentOf: agentOf, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/self", s.self)
	mux.HandleFunc("PUT /v1/self/task", s.renew)
	mux.HandleFunc("DELETE /v1/self/task", s.end)
	mux.HandleFunc("POST /v1/self/stepup", s.request)
	mux.HandleFunc("GET /v1/self/stepup", s.requests)
	s.srv = socketServer(s.guard(mux), log)
	return s
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
		c, ok := r.Context().Value(callerKey{}).(Caller)
		if !ok {
			refuse(w, http.StatusForbidden, errors.New("the caller's credentials could not be read"))
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

func (s *AgentServer) self(w http.ResponseWriter, r *http.Request) {
	a, ok := s.svc.Agent(selfSlot(r))
	if !ok {
		refuse(w, http.StatusNotFound, errors.New("the caller's agent is gone"))
		return
	}
	reply(w, http.StatusOK, a)
}

// renew renews the agent's task as a heartbeat does: the agent presents its task's current
// credential (the file TETHER_TASK_CREDENTIAL_FILE names) and gets the next one; the task never
// lives past its NotAfter.
func (s *AgentServer) renew(w http.ResponseWriter, r *http.Request) {
	var req HeartbeatRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	ttl, ok := ttlOf(w, req.TTL)
	if !ok {
		return
	}
	if req.Credential == "" {
		refuse(w, http.StatusBadRequest, errors.New("credential is required: a renewal presents the task's current credential"))
		return
	}
	slot := selfSlot(r)
	cred, err := s.svc.Heartbeat(r.Context(), slot, req.Credential, ttl)
	if err != nil {
		s.log.Warn("renewal refused", "slot", slot, "error", err)
		refuse(w, credentialStatus(err), err)
		return
	}
	reply(w, http.StatusOK, cred)
}

func (s *AgentServer) end(w http.ResponseWriter, r *http.Request) {
	result(w, func() (agents.Agent, error) { return s.svc.EndTask(selfSlot(r)) })
}

func (s *AgentServer) request(w http.ResponseWriter, r *http.Request) {
	var req StepupRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	slot := selfSlot(r)
	s.log.Info("step-up request", "slot", slot, "action", req.Action, "resource", req.Resource)
	stepupResult(w, func() (stepup.Request, error) {
		return s.svc.RequestStepup(r.Context(), slot, req.Action, req.Resource, req.Reason)
	})
}

func (s *AgentServer) requests(w http.ResponseWriter, r *http.Request) {
	slot := uint32(selfSlot(r))
	reply(w, http.StatusOK, s.svc.Stepups(&slot))
}
