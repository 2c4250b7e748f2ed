# distill - one GNU Makefile.
#   make            build build/distill and build/libkd.a
#   make test       build and run the test suite (what CI runs)
#   make bench      build and run the benchmarks (PyTorch side when installed)
#   make interop    PyTorch and the official safetensors library read our
#                   checkpoints and we read theirs (venv in build/; not in CI)
#   SANITIZE=1      build with -fsanitize=address,undefined (separate build dir)
#   DEBUG=1         -O0
#   OMP=0           no OpenMP
#   ARCH=x86-64     portable binary (default: -march=native)
#   make fuzz       libFuzzer harnesses (fuzz/, clang-14) run FUZZ_SECONDS each
CC      ?= cc
# -march=native: AVX2/AVX-512 for our element-wise loops (BLAS picks its own
# kernels at run time). ARCH=x86-64 builds a binary that runs on any x86-64.
ARCH    ?= native
BLASDIR ?= $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/openblas-openmp /usr/lib/aarch64-linux-gnu/openblas-openmp))
OPT     := -O2
ifeq ($(DEBUG),1)
OPT     := -O0
endif
# the dynamic cost model lets -O2 vectorise loops that need a runtime alias check
CFLAGS  ?= $(OPT) -g -march=$(ARCH) -fvect-cost-model=dynamic
CFLAGS  += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -Iinclude -Isrc -MMD -MP
LDLIBS  := -lcjson -linih -lz -lm
ifneq ($(BLASDIR),)
LDLIBS  := -L$(BLASDIR) -Wl,-rpath,$(BLASDIR) -lopenblas $(LDLIBS)
else
LDLIBS  := -lopenblas $(LDLIBS)
endif
ifneq ($(OMP),0)
CFLAGS  += -fopenmp
LDFLAGS += -fopenmp
else
# without OpenMP the pragmas are plain serial loops, and a thread count
# that only feeds a num_threads() clause is an unused parameter
CFLAGS  += -Wno-unknown-pragmas -Wno-unused-parameter
endif
BUILD   := build
ifeq ($(SANITIZE),1)
CFLAGS  += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS += -fsanitize=address,undefined
BUILD   := build-san
endif

LIB_SRC  := $(sort $(wildcard src/core/*.c src/ops/*.c src/nn/*.c src/distill/*.c src/optim/*.c src/data/*.c src/io/*.c src/train/*.c))
CLI_SRC  := $(sort $(wildcard src/cli/*.c))
TEST_SRC := $(sort $(wildcard tests/*.c))
BENCH_SRC:= $(sort $(wildcard bench/*.c))
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/%.o)
CLI_OBJ  := $(CLI_SRC:%.c=$(BUILD)/%.o)
TEST_OBJ := $(TEST_SRC:%.c=$(BUILD)/%.o)

all: $(BUILD)/distill

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libkd.a: $(LIB_OBJ)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/distill: $(CLI_OBJ) $(BUILD)/libkd.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/test_all: $(TEST_OBJ) $(BUILD)/libkd.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# OMP_WAIT_POLICY=passive: threads sleep between parallel regions, so the two
# cores are not burnt spinning while a single-threaded part runs.
test: $(BUILD)/test_all $(BUILD)/distill
	OMP_WAIT_POLICY=passive KD_DISTILL=$(BUILD)/distill $(BUILD)/test_all

$(BUILD)/bench_engine: $(BUILD)/bench/bench_engine.o $(BUILD)/libkd.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/bench_lm: $(BUILD)/bench/bench_lm.o $(BUILD)/libkd.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

bench: $(BUILD)/bench_engine $(BUILD)/bench_lm $(BUILD)/distill
	bash bench/run.sh $(BUILD)

# language-model speed only (bench/lm.sh): training, distillation, generation vs PyTorch
bench-lm: $(BUILD)/bench_lm
	bash bench/lm.sh $(BUILD)

# The venv sees the system's packages by default, so an installed torch is
# reused instead of downloaded (about 1 GB); INTEROP_VENV_FLAGS= gives a clean
# venv that installs everything from PyPI. Output: $(BUILD)/interop.log.
INTEROP_VENV       ?= $(BUILD)/interop-venv
INTEROP_VENV_FLAGS ?= --system-site-packages
interop: $(BUILD)/distill
	test -x $(INTEROP_VENV)/bin/python || python3 -m venv $(INTEROP_VENV_FLAGS) $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install --disable-pip-version-check --quiet torch safetensors numpy
	$(INTEROP_VENV)/bin/python tools/interop.py --distill $(BUILD)/distill --work $(BUILD)/interop --log $(BUILD)/interop.log

# Fuzzing (docs/fuzzing.md): each fuzz/fuzz_NAME.c links a separate build of
# the library (build-fuzz/, clang with ASan + UBSan + libFuzzer coverage, no
# OpenMP) and runs FUZZ_SECONDS from its seeds (fuzz/corpus/NAME, read only)
# and what earlier runs found (build-fuzz/corpus/NAME). A crash fails make;
# its input is saved as build-fuzz/crashes/NAME-crash-*.
FUZZ_CC      ?= clang-14
FUZZ_SECONDS ?= 10
FUZZ_NAMES   := safetensors config spec tokenizer cache idx text
FUZZ_BUILD   := build-fuzz
# -Wno-unused-parameter: without OpenMP some kernels leave their thread count unused
FUZZ_CFLAGS  := -O1 -g -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -Wno-unused-parameter -Iinclude -Isrc -MMD -MP \
                -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_LIB_OBJ := $(LIB_SRC:%.c=$(FUZZ_BUILD)/%.o)

$(FUZZ_BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(FUZZ_BUILD)/libkd.a: $(FUZZ_LIB_OBJ)
	rm -f $@ && ar rcs $@ $^

$(FUZZ_BUILD)/fuzz_%: $(FUZZ_BUILD)/fuzz/fuzz_%.o $(FUZZ_BUILD)/libkd.a
	$(FUZZ_CC) -fsanitize=fuzzer,address,undefined -o $@ $^ $(LDLIBS)

# the seed generator (fuzz/make_corpus.sh), an ordinary build
$(BUILD)/make_corpus: $(BUILD)/fuzz/make_corpus.o $(BUILD)/libkd.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

.SECONDARY: $(FUZZ_NAMES:%=$(FUZZ_BUILD)/fuzz/fuzz_%.o)

fuzz: $(FUZZ_NAMES:%=$(FUZZ_BUILD)/fuzz_%)
	for n in $(FUZZ_NAMES); do bash fuzz/run.sh $(FUZZ_BUILD) $$n $(FUZZ_SECONDS) || exit 1; done

clean:
	rm -rf build build-san build-fuzz

.PHONY: all test bench bench-lm interop clean fuzz
-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d) $(TEST_OBJ:.o=.d) $(BENCH_SRC:%.c=$(BUILD)/%.d)
-include $(FUZZ_LIB_OBJ:.o=.d) $(FUZZ_NAMES:%=$(FUZZ_BUILD)/fuzz/fuzz_%.d)
