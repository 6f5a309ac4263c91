package api

import (
	"errors"
	"net/http"
	"strings"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/killpath"
)

// The kill path: kill, the kills in progress and the deny list, readmission.

func (s *Server) kill(c *request, req KillRequest) (any, error) {
	if strings.TrimSpace(req.Reason) == "" {
		return nil, badRequest(errors.New("reason is required: the kill record says why"))
	}
	t := killpath.Target{Slot: req.Slot, SpiffeID: req.SpiffeID, TaskID: req.TaskID, PID: req.PID}
	kills, err := s.svc.Kills.KillTarget(c.r.Context(), t, req.Reason, c.by(), req.Terminate)
	if err != nil && (len(kills) == 0 || errors.Is(err, agents.ErrInvalid)) {
		if !errors.Is(err, agents.ErrInvalid) && !errors.Is(err, agents.ErrNotFound) {
			err = withStatus(http.StatusInternalServerError, err)
		}
		return nil, err
	}
	if err != nil {
		s.log.Error("kill partly failed", "error", err)
	}
	return kills, nil
}

func (s *Server) kills(*request) (any, error) {
	return KillStatus{Pending: s.svc.Kills.Pending(), Denied: s.svc.Kills.DeniedIDs()}, nil
}

func (s *Server) readmit(c *request, req ReadmitRequest) (any, error) {
	list, err := s.svc.Kills.Readmit(req.SpiffeID)
	if err != nil {
		return nil, badRequest(err)
	}
	return list, nil
}
