package agents

import (
	"fmt"
	"os"
	"time"

	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// Cgroups is what the registry needs of the cgroup hierarchy.
type Cgroups interface {
	ID(path string) (uint64, error)
	// Mkdir creates one agent cgroup, nested at most dataplane.MaxAncestors deep below it;
	// os.ErrExist when it exists.
	Mkdir(path string) error
	// Remove kills what runs in the cgroup and removes it.
	Remove(path string) error
	// DepthLimited reports whether cgroups below path can only nest as deep as the hooks look.
	DepthLimited(path string) bool
}

type realCgroups struct{}

func (realCgroups) ID(path string) (uint64, error) { return cgroups.ID(path) }
func (realCgroups) Remove(path string) error       { return cgroups.Remove(path, 10*time.Second) }

// Mkdir also limits nesting: a process more than MaxAncestors levels below its agent would not
// be found by the hooks, so the agent could nest that deep to leave exec enforcement.
func (realCgroups) Mkdir(path string) error {
	if err := os.Mkdir(path, 0o755); err != nil {
		return err
	}
	if err := cgroups.SetMaxDepth(path, dataplane.MaxAncestors); err != nil {
		os.Remove(path)
		return fmt.Errorf("limiting the depth of %s: %w", path, err)
	}
	return nil
}

func (realCgroups) DepthLimited(path string) bool {
	n, ok, err := cgroups.MaxDepth(path)
	return err == nil && ok && n <= dataplane.MaxAncestors
}
