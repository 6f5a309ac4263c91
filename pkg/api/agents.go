package api

import (
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// The agents: list, register (bind a cgroup or launch), unregister, mode, killed flag, resume.

func (s *Server) status(*request) (any, error) { return s.svc.Status(), nil }

func (s *Server) list(*request) (any, error) { return s.svc.Agents.List(), nil }

func (s *Server) get(c *request) (any, error) { return c.agent, nil }

// register binds an existing cgroup (admins) or launches a new agent (launch rules). Who may is
// decided here, from the body.
func (s *Server) register(c *request, req RegisterRequest) (any, error) {
	reg := agents.Registration{SpiffeID: req.SpiffeID, Cgroup: req.Cgroup, Launch: req.Launch, Labels: req.Labels}
	if req.Task != nil {
		spec, err := taskSpec(*req.Task)
		if err != nil {
			return nil, err
		}
		reg.Task = &spec
	}
	if req.Launch {
		reg.Selectors = []string{fmt.Sprintf("launch:uid:%d", c.caller.UID)}
	} else {
		reg.Selectors = []string{fmt.Sprintf("admin:uid:%d", c.caller.UID)}
	}
	if err := s.mayRegister(c, req); err != nil {
		return nil, err
	}
	if req.Launch {
		if err := s.launchUID(c, req, &reg); err != nil {
			return nil, err
		}
	} else if req.UID != nil {
		reg.UID = *req.UID
	}
	a, err := s.svc.Agents.Register(reg)
	if err != nil && !errors.Is(err, agents.ErrUIDTaken) {
		err = badRequest(err)
	}
	if err != nil {
		return nil, err
	}
	s.log.Info("API registered agent", "slot", a.Slot, "spiffe_id", a.SpiffeID, "caller_uid", c.caller.UID, "caller_pid", c.caller.PID)
	return a, nil
}

// mayRegister checks a registration's shape and whether the caller may ask for it.
func (s *Server) mayRegister(c *request, req RegisterRequest) error {
	switch {
	case req.SpiffeID == "":
		return badRequest(errors.New("spiffe_id is required"))
	case req.Launch == (req.Cgroup != ""):
		return badRequest(errors.New("give either launch: true or an existing cgroup"))
	case !req.Launch:
		if err := s.admin(c); err != nil {
			return err
		}
	case !s.policy().MayLaunch(c.caller, req.SpiffeID):
		return forbidden(fmt.Errorf("uid %d may not launch %s (no launch rule allows it)", c.caller.UID, req.SpiffeID))
	}
	// Labels under tether.dev/ steer tether itself (tether.dev/mode: audit): admins only.
	for k := range req.Labels {
		if strings.HasPrefix(k, agents.ReservedLabelPrefix) && !s.policy().IsAdmin(c.caller) {
			return forbidden(fmt.Errorf("label %q: labels under %s are for admins", k, agents.ReservedLabelPrefix))
		}
	}
	return nil
}

// launchUID sets the uid a launched agent's command runs as: a uid of its own, root, or the
// user the launcher names (any user if the launcher is root, else only itself).
func (s *Server) launchUID(c *request, req RegisterRequest, reg *agents.Registration) error {
	uid := c.caller.UID
	reg.Launcher, reg.LauncherPID, reg.ShareUID = &uid, c.caller.PID, req.ShareUID
	switch {
	case req.AllowRoot || req.UID != nil && *req.UID == 0:
		if !req.AllowRoot || !s.policy().MayLaunchRoot(c.caller, req.SpiffeID) {
			return forbidden(fmt.Errorf("an agent running as root needs --allow-root and a launch rule with root: true that lets uid %d launch %s", c.caller.UID, req.SpiffeID))
		}
		reg.UID = 0
	case req.UID == nil:
		reg.DynamicUID = true
	case c.caller.UID == 0 || *req.UID == c.caller.UID:
		reg.UID = *req.UID
	default:
		return forbidden(fmt.Errorf("uid %d may not launch an agent running as uid %d", c.caller.UID, *req.UID))
	}
	return nil
}

func (s *Server) unregister(c *request) (any, error) {
	if err := s.svc.Agents.Unregister(c.slot); err != nil {
		return nil, withStatus(http.StatusInternalServerError, err)
	}
	return nil, nil
}

func (s *Server) setMode(c *request, req ModeRequest) (any, error) {
	var mode *dataplane.Mode
	if req.Mode != nil {
		m, err := dataplane.ParseMode(*req.Mode)
		if err != nil {
			return nil, badRequest(err)
		}
		mode = &m
	}
	return s.svc.Agents.SetMode(c.slot, mode)
}

func (s *Server) setKilled(c *request, req KilledRequest) (any, error) {
	if req.Killed == nil {
		return nil, badRequest(errors.New("killed (true or false) is required"))
	}
	s.log.Info("API killed flag", "slot", c.slot, "killed", *req.Killed, "caller_uid", c.caller.UID)
	return s.svc.Agents.SetKilled(c.slot, *req.Killed)
}

func (s *Server) resume(c *request) (any, error) { return s.svc.Kills.Resume(c.slot) }
