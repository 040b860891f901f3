// envoy-check validates the Envoy configs inside Istio EnvoyFilters against Envoy's own protos
// (go-control-plane, the Go module Envoy's API is published as): every typed config — directly
// typed (`@type`) or wrapped in a `udpa.type.v1.TypedStruct` — must parse as its message with no
// unknown field and pass the message's protoc-gen-validate rules; every patch value must parse
// as the Envoy object its `applyTo` names.
//
// Higress runs its own Envoy build, which adds fields to some messages. Those fields are listed
// in `higressFields` with the type the build reads them as, checked here, and removed before the
// upstream message is checked; nothing else is allowed beyond upstream Envoy.
//
// Input (stdin): a JSON array of EnvoyFilter objects. Output: one line per problem on stdout;
// exit status 1 when there is any, 2 when the input cannot be read.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	_ "github.com/cncf/xds/go/udpa/type/v1"
	_ "github.com/cncf/xds/go/xds/type/matcher/v3"
	_ "github.com/cncf/xds/go/xds/type/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/custom_response/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/http/custom_response/local_response_policy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/http/custom_response/redirect_policy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

const typedStruct = "type.googleapis.com/udpa.type.v1.TypedStruct"

// fieldKind is how Higress's Envoy build reads a field it adds.
type fieldKind int

const (
	boolValue      fieldKind = iota // google.protobuf.BoolValue: a JSON bool
	uint32Value                     // google.protobuf.UInt32Value: a non-negative JSON integer
	stringField                     // a JSON string
	bufferSettings                  // {max_request_bytes, allow_partial_message, pack_as_bytes}
)

// Fields Higress's Envoy build adds to upstream messages, with how it reads them
// (`source/extensions/http/custom_response/redirect_policy/redirect_policy.cc`, `HIGRESS` build).
var higressFields = map[string]map[string]fieldKind{
	"envoy.extensions.http.custom_response.redirect_policy.v3.RedirectPolicy": {
		"use_original_request_uri":    boolValue,
		"keep_original_response_code": boolValue,
		"max_internal_redirects":      uint32Value,
		"use_original_request_body":   boolValue,
		"only_redirect_upstream_code": boolValue,
		"uri_from_response_header":    stringField,
	},
	// Buffers the request body so a redirect can send it again (the filter's config.cc and
	// decodeData in Higress's build; the Higress console writes it).
	"envoy.extensions.filters.http.custom_response.v3.CustomResponse": {
		"with_request_body": bufferSettings,
	},
}

// The object each `applyTo` patches, for the patch value's own fields.
var applyTo = map[string]func() proto.Message{
	"HTTP_ROUTE":          func() proto.Message { return &route.Route{} },
	"VIRTUAL_HOST":        func() proto.Message { return &route.VirtualHost{} },
	"ROUTE_CONFIGURATION": func() proto.Message { return &route.RouteConfiguration{} },
}

type validator interface{ ValidateAll() error }

type checker struct{ problems []string }

func (c *checker) fail(at, format string, args ...any) {
	c.problems = append(c.problems, at+": "+fmt.Sprintf(format, args...))
}

// higress checks and removes the fields Higress's build adds to `name`; reports whether the
// message takes its redirect target from one of them (upstream requires `uri` or
// `redirect_action` instead).
func (c *checker) higress(at, name string, obj map[string]any) bool {
	fields := higressFields[name]
	target := false
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v, ok := obj[k]
		if !ok {
			continue
		}
		switch fields[k] {
		case boolValue:
			b, isBool := v.(bool)
			if !isBool {
				c.fail(at, "%s.%s must be a bool, is %v", name, k, v)
			}
			if k == "use_original_request_uri" && b {
				target = true
			}
		case uint32Value:
			n, isNum := v.(float64)
			if !isNum || n < 0 || n != float64(uint32(n)) {
				c.fail(at, "%s.%s must be a uint32, is %v", name, k, v)
			}
		case bufferSettings:
			b, isObj := v.(map[string]any)
			n, isNum := b["max_request_bytes"].(float64)
			if !isObj || !isNum || n <= 0 || n != float64(uint32(n)) {
				c.fail(at, "%s.%s must be {max_request_bytes: uint32 > 0, …}, is %v", name, k, v)
			}
			for bk, bv := range b {
				switch bk {
				case "max_request_bytes":
				case "allow_partial_message", "pack_as_bytes":
					if _, isBool := bv.(bool); !isBool {
						c.fail(at, "%s.%s.%s must be a bool", name, k, bk)
					}
				default:
					c.fail(at, "%s.%s has unknown field %q", name, k, bk)
				}
			}
		case stringField:
			s, isStr := v.(string)
			if !isStr || s == "" {
				c.fail(at, "%s.%s must be a non-empty string, is %v", name, k, v)
			}
			target = true
		}
		delete(obj, k)
	}
	if target {
		_, uri := obj["uri"]
		_, action := obj["redirect_action"]
		if uri || action {
			c.fail(at, "%s: exactly one redirect target (uri, redirect_action, use_original_request_uri, uri_from_response_header)", name)
		}
		// Upstream's rule (one of uri / redirect_action) is met by Higress's target.
		obj["uri"] = "http://higress-target.invalid/"
	}
	return target
}

// typed checks a typed config node (`@type`, or a TypedStruct) wherever it appears in `v`.
func (c *checker) walk(at string, v any) {
	switch n := v.(type) {
	case map[string]any:
		if t, ok := n["@type"].(string); ok {
			c.typed(at, t, n)
			return
		}
		keys := make([]string, 0, len(n))
		for k := range n {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			c.walk(at+"."+k, n[k])
		}
	case []any:
		for i, e := range n {
			c.walk(fmt.Sprintf("%s[%d]", at, i), e)
		}
	}
}

func (c *checker) typed(at, typeURL string, node map[string]any) {
	var body map[string]any
	if typeURL == typedStruct {
		inner, _ := node["type_url"].(string)
		value, ok := node["value"].(map[string]any)
		if inner == "" || !ok {
			c.fail(at, "TypedStruct needs type_url and an object value")
			return
		}
		for k := range node {
			if k != "@type" && k != "type_url" && k != "value" {
				c.fail(at, "TypedStruct has unknown field %q", k)
			}
		}
		typeURL, body = inner, value
	} else {
		body = map[string]any{}
		for k, v := range node {
			if k != "@type" {
				body[k] = v
			}
		}
	}
	name := protoreflect.FullName(typeURL[strings.LastIndex(typeURL, "/")+1:])
	mt, err := protoregistry.GlobalTypes.FindMessageByName(name)
	if err != nil {
		c.fail(at, "unknown message type %s", name)
		return
	}
	// Nested typed configs are checked on their own (a TypedStruct's value is opaque to the
	// outer message's parser).
	for k, v := range body {
		c.walk(at+"."+k, v)
	}
	c.higress(at, string(name), body)
	c.message(at, string(name), body, mt.New().Interface(), true)
}

// message parses `body` as `msg`, strictly, and runs its validation rules when `validate`.
func (c *checker) message(at, name string, body map[string]any, msg proto.Message, validate bool) {
	raw, err := json.Marshal(body)
	if err != nil {
		c.fail(at, "%s: %v", name, err)
		return
	}
	if err := (protojson.UnmarshalOptions{}).Unmarshal(raw, msg); err != nil {
		c.fail(at, "%s: %v", name, err)
		return
	}
	if !validate {
		return
	}
	if v, ok := msg.(validator); ok {
		if err := v.ValidateAll(); err != nil {
			c.fail(at, "%s: %v", name, err)
		}
	}
}

func main() {
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "envoy-check:", err)
		os.Exit(2)
	}
	var filters []map[string]any
	if err := json.Unmarshal(input, &filters); err != nil {
		fmt.Fprintln(os.Stderr, "envoy-check: input is not a JSON array of objects:", err)
		os.Exit(2)
	}
	c := &checker{}
	for _, f := range filters {
		meta, _ := f["metadata"].(map[string]any)
		name, _ := meta["name"].(string)
		spec, _ := f["spec"].(map[string]any)
		patches, _ := spec["configPatches"].([]any)
		if len(patches) == 0 {
			c.fail(name, "no configPatches")
		}
		for i, p := range patches {
			at := fmt.Sprintf("%s.configPatches[%d]", name, i)
			patch, _ := p.(map[string]any)
			kind, _ := patch["applyTo"].(string)
			value, _ := patch["patch"].(map[string]any)["value"].(map[string]any)
			newMsg, known := applyTo[kind]
			if !known {
				c.fail(at, "applyTo %q is not checked here", kind)
				continue
			}
			if value == nil {
				c.fail(at, "patch has no value")
				continue
			}
			c.walk(at+".patch.value", value)
			// The patch value's own fields, with every typed config replaced by an empty
			// TypedStruct (checked above on its own).
			c.message(at+".patch.value", kind, opaque(value).(map[string]any), newMsg(), false)
		}
	}
	for _, p := range c.problems {
		fmt.Println(p)
	}
	if len(c.problems) > 0 {
		os.Exit(1)
	}
}

// opaque replaces every typed config in `v` by an empty TypedStruct, so the enclosing message
// parses without resolving (or re-checking) it.
func opaque(v any) any {
	switch n := v.(type) {
	case map[string]any:
		if _, ok := n["@type"].(string); ok {
			return map[string]any{"@type": typedStruct}
		}
		out := map[string]any{}
		for k, e := range n {
			out[k] = opaque(e)
		}
		return out
	case []any:
		out := make([]any, len(n))
		for i, e := range n {
			out[i] = opaque(e)
		}
		return out
	default:
		return v
	}
}
