#!/usr/bin/env bash
# Installs the face models and test photos facematch's tests and benchmarks
# use, from package registries, into a cache outside the repository (model
# weights are never committed):
#   - npm `faceplugin-face-recognition-js@0.0.1` (MIT): model/fr_feature.onnx
#     (112x112 aligned face -> 512-d embedding) and model/fr_detect.onnx
#   - PyPI sdist `face_recognition==1.3.0` (MIT): tests/test_images/*.jpg
# Prints the directory. Safe to re-run; does nothing when already present.
set -euo pipefail
dest="${ESTATE_FACE_ASSETS:-${HOME}/.cache/estate-mesh/face-assets}"
if [ -f "$dest/model/fr_feature.onnx" ] && [ -f "$dest/model/fr_detect.onnx" ] && [ -f "$dest/images/obama.jpg" ]; then
  echo "$dest"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest/model" "$dest/images"
(
  cd "$work"
  npm pack --silent faceplugin-face-recognition-js@0.0.1 >/dev/null 2>&1
  tar xzf faceplugin-face-recognition-js-0.0.1.tgz package/model/fr_feature.onnx package/model/fr_detect.onnx package/LICENSE
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: face_recognition==1.3.0 -d . >/dev/null
  tar xzf face_recognition-1.3.0.tar.gz --wildcards 'face_recognition-1.3.0/tests/test_images/*.jpg' face_recognition-1.3.0/LICENSE
)
cp "$work/package/model/fr_feature.onnx" "$work/package/model/fr_detect.onnx" "$dest/model/"
cp "$work/package/LICENSE" "$dest/model/LICENSE.faceplugin"
cp "$work"/face_recognition-1.3.0/tests/test_images/*.jpg "$dest/images/"
cp "$work/face_recognition-1.3.0/LICENSE" "$dest/images/LICENSE.face_recognition"
echo "$dest"
