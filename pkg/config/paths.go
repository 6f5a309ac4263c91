package config

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
)

// RemoteAddressesEnv lists the DNS proxy's remote addresses when dns.proxy.remote_addresses does
// not (the chart sets it to the pod's addresses, status.podIPs).
const RemoteAddressesEnv = "TETHER_DNS_REMOTE_ADDRESSES"

// RemoteAddresses are the DNS proxy's remote addresses: the configured ones, else those of
// $TETHER_DNS_REMOTE_ADDRESSES; at most one IPv4 and one IPv6 address, neither unspecified nor
// loopback.
func RemoteAddresses(configured []string) (v4, v6 netip.Addr, err error) {
	list, from := configured, "" // the configuration's errors name where they are
	if len(list) == 0 {
		if env := strings.TrimSpace(os.Getenv(RemoteAddressesEnv)); env != "" {
			list, from = strings.Split(env, ","), "$"+RemoteAddressesEnv+": "
		}
	}
	for _, s := range list {
		a, perr := netip.ParseAddr(strings.TrimSpace(s))
		switch {
		case perr != nil:
			return v4, v6, fmt.Errorf("%s%q is not an IP address", from, s)
		case a.IsUnspecified() || a.IsLoopback():
			return v4, v6, fmt.Errorf("%s%v: want an address agents in other network namespaces reach (not unspecified or loopback)", from, a)
		case a.Unmap().Is4() && !v4.IsValid():
			v4 = a.Unmap()
		case a.Is6() && !a.Is4In6() && !v6.IsValid():
			v6 = a.WithZone("")
		default:
			return v4, v6, fmt.Errorf("%s%v: at most one IPv4 and one IPv6 address", from, a)
		}
	}
	return v4, v6, nil
}

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
