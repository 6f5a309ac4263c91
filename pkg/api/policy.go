package api

import (
	"fmt"
	"net/http"
)

// The policy in force: reload it, evaluate one of its decisions.

func (s *Server) reloadPolicy(c *request) (any, error) {
	st, err := s.svc.Policy.Reload(c.r.Context(), fmt.Sprintf("tetherctl policy reload (uid %d)", c.caller.UID))
	if err != nil {
		return nil, withStatus(http.StatusUnprocessableEntity, err)
	}
	return st, nil
}

func (s *Server) evalPolicy(c *request, req PolicyEvalRequest) (any, error) {
	res, err := s.svc.Policy.Eval(c.r.Context(), req.Query, req.Input)
	if err != nil {
		return nil, withStatus(http.StatusUnprocessableEntity, err)
	}
	return res, nil
}
