// Command oci-check reads an OCI image layout the way registries and runtimes read images (with
// go-containerregistry, the library Istio's and Higress's Wasm fetchers use), so our images are
// tested by a real consumer rather than by the script that wrote them.
//
//	oci-check image <layout> <rootfs.tar>   verify every digest and size; write the flattened
//	                                        filesystem; print the config a runtime would use (JSON)
//	oci-check wasm <layout> <plugin.wasm>   verify; take the module out by the rule of the fetchers'
//	                                        "compat" variant: exactly one layer, of the OCI
//	                                        tar+gzip type, holding a file named plugin.wasm
package main

import (
	"archive/tar"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

func main() {
	if len(os.Args) != 4 || (os.Args[1] != "image" && os.Args[1] != "wasm") {
		fmt.Fprintln(os.Stderr, "usage: oci-check image|wasm <layout> <out>")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2], os.Args[3]); err != nil {
		fmt.Fprintln(os.Stderr, "oci-check:", err)
		os.Exit(1)
	}
}

// onlyImage returns the single image the layout's index names.
func onlyImage(dir string) (v1.Image, error) {
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, err
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	if len(m.Manifests) != 1 {
		return nil, fmt.Errorf("the index names %d manifests, want 1", len(m.Manifests))
	}
	return idx.Image(m.Manifests[0].Digest)
}

func run(mode, dir, out string) error {
	img, err := onlyImage(dir)
	if err != nil {
		return err
	}
	// Digests, sizes, diff IDs and the config's rootfs all agree, as a pull would check.
	if err := validate.Image(img); err != nil {
		return fmt.Errorf("invalid image: %w", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	var mediaTypes []string
	for _, l := range layers {
		mt, err := l.MediaType()
		if err != nil {
			return err
		}
		mediaTypes = append(mediaTypes, string(mt))
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return err
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	if mode == "wasm" {
		if err := wasmModule(layers, out); err != nil {
			return err
		}
	} else {
		f, err := os.Create(out)
		if err != nil {
			return err
		}
		defer f.Close()
		rc := mutate.Extract(img)
		defer rc.Close()
		if _, err := io.Copy(f, rc); err != nil {
			return err
		}
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"digest":       digest.String(),
		"architecture": cfg.Architecture,
		"os":           cfg.OS,
		"user":         cfg.Config.User,
		"entrypoint":   cfg.Config.Entrypoint,
		"env":          cfg.Config.Env,
		"layers":       mediaTypes,
	})
}

func wasmModule(layers []v1.Layer, out string) error {
	if len(layers) != 1 {
		return fmt.Errorf("a compat Wasm image has one layer, this one %d", len(layers))
	}
	mt, err := layers[0].MediaType()
	if err != nil {
		return err
	}
	if mt != types.OCILayer {
		return fmt.Errorf("layer type %s, the fetchers want %s", mt, types.OCILayer)
	}
	rc, err := layers[0].Compressed()
	if err != nil {
		return err
	}
	defer rc.Close()
	gz, err := gzip.NewReader(rc)
	if err != nil {
		return fmt.Errorf("layer is not gzip: %w", err)
	}
	tr := tar.NewReader(gz)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return errors.New("no plugin.wasm in the layer")
		}
		if err != nil {
			return err
		}
		if filepath.Base(h.Name) == "plugin.wasm" {
			data, err := io.ReadAll(tr)
			if err != nil {
				return err
			}
			return os.WriteFile(out, data, 0o644)
		}
	}
}
