package daemon

import (
	"log/slog"

	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/identity"
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
