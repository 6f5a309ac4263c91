package main

// examples are the Example of every tetherctl command, by its path below tetherctl.
var examples = map[string]string{
	"run": `  sudo tetherctl run --id spiffe://example.org/agent/coder -- /usr/local/bin/agent
  sudo tetherctl run --id spiffe://example.org/agent/coder --user coder --task-type coding --sensitivity internal -- agent`,
	"status":               "  tetherctl status\n  tetherctl status -o yaml",
	"agents":               "  tetherctl agents\n  tetherctl agents -o json | jq '.[] | select(.killed)'",
	"mode":                 "  tetherctl mode 3 audit\n  tetherctl mode spiffe://example.org/agent/coder default",
	"set-killed":           "  tetherctl set-killed spiffe://example.org/agent/coder true",
	"unregister":           "  tetherctl unregister 3",
	"task start":           "  tetherctl task start 3 --type coding --sensitivity internal --ttl 2h",
	"task renew":           "  tetherctl task renew spiffe://example.org/agent/coder --ttl 30m",
	"task end":             "  tetherctl task end 3",
	"task approve":         `  tetherctl task approve 3 --action connect --resource production --ttl 15m --uses 5`,
	"task handoff":         `  tetherctl task handoff 3 --to 4 --credential @/run/tether/credentials/3/task.jwt --type coding --ttl 10m`,
	"credential show":      "  tetherctl credential show 3",
	"credential heartbeat": "  tetherctl credential heartbeat 3 --credential @/run/tether/credentials/3/task.jwt --ttl 2m",
	"credential verify":    "  tetherctl credential verify @/run/tether/credentials/3/task.jwt\n  cat task.jwt | tetherctl credential verify -",
	"credential revoked":   "  tetherctl credential revoked",
	"kill": `  tetherctl kill spiffe://example.org/agent/coder --reason "exfiltration attempt" --terminate
  tetherctl kill --pid 4242 --reason "runaway tool"
  tetherctl kill --cluster spiffe://cluster.local/ns/agents/sa/coder --reason "incident 7"`,
	"resume":         "  tetherctl resume 3",
	"readmit":        "  tetherctl readmit spiffe://example.org/agent/coder",
	"kills":          "  tetherctl kills",
	"events":         "  tetherctl events --verdict deny\n  tetherctl events --id spiffe://example.org/agent/coder --count 10 -o json",
	"policy check":   "  tetherctl policy check /etc/tether/policy --input probe.json",
	"policy eval":    "  tetherctl policy eval --input input.json --query allow\n  tetherctl policy eval --policy ./policies --input input.json",
	"policy reload":  "  tetherctl policy reload",
	"stepup request": `  tetherctl stepup request --action connect --resource production --reason "deploy hotfix"`,
	"stepup list":    "  tetherctl stepup list",
	"approvals":      "  tetherctl approvals --follow",
	"approve":        "  tetherctl approve 9f3c2a --uses 3 --ttl 10m",
	"deny":           `  tetherctl deny 9f3c2a --why "not during the freeze"`,
}
