// Package policies holds tether's shipped policies (package tether), their tests, their data and
// the JSON schema of their input, embedded into tetherd as its default policy.
package policies

import "embed"

// FS holds tether/*.rego, data.json and input.schema.json.
//
//go:embed tether/*.rego data.json input.schema.json
var FS embed.FS
