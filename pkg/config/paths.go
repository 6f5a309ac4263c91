package config

import (
	"os"
	"path/filepath"
)

// NodeName is the configured node name, else $NODE_NAME (the DaemonSet sets spec.nodeName), else
// the host name (in a pod without the host's network, the pod's name: hence $NODE_NAME).
func NodeName(configured string) string {
	if configured != "" {
		return configured
	}
	if n := os.Getenv("NODE_NAME"); n != "" {
		return n
	}
	n, _ := os.Hostname()
	return n
}

// SensitiveSockets are the unix sockets no grant may reach: tetherd's API socket, the SPIRE
// sockets, and api.sensitive_sockets.
func (c *Loaded) SensitiveSockets() []string {
	out := append([]string{c.API.Socket}, c.API.SensitiveSockets...)
	if sp := c.Identity.SPIRE; sp != nil {
		for _, s := range []string{sp.AdminSocket, sp.ServerSocket, sp.WorkloadSocket} {
			if s != "" {
				out = append(out, s)
			}
		}
	}
	return out
}

// HiddenPaths are what no launched agent sees: tether's admin socket, key, state and
// configuration, the SPIRE sockets, api.sensitive_sockets and confinement.hide. The agent socket
// stays (it is every agent's).
func (c *Loaded) HiddenPaths() []string {
	out := append([]string{c.API.Socket, c.Credentials.KeyFile, c.Kill.StateFile}, c.SensitiveSockets()...)
	if filepath.IsAbs(c.Source) {
		out = append(out, c.Source)
	}
	out = append(out, c.Confinement.Hide...)
	seen := map[string]bool{}
	kept := out[:0]
	for _, p := range out {
		if p != "" && filepath.IsAbs(p) && !seen[p] && p != c.API.AgentSocket {
			seen[p] = true
			kept = append(kept, p)
		}
	}
	return kept
}
