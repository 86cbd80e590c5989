// glmrt benchmark helper: greedy decoding with llama.cpp's C API on given prompt token ids, for the
// cross-check of benchmarks/vs_llama_cpp.py (llama-bench does the timing; it prints no tokens).
//
//   glmrt_llama_greedy MODEL.gguf THREADS N_NEW ID [ID ...]
//
// Prints one JSON line: {"generated": [...]} -- the argmax of the last position's logits after the
// prompt, then after each generated token (no sampler, no end-of-sequence stop).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "llama.h"

static int argmax(const float* logits, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return best;
}

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s MODEL.gguf THREADS N_NEW ID [ID ...]\n", argv[0]);
    return 2;
  }
  const char* path = argv[1];
  const int threads = std::atoi(argv[2]);
  const int n_new = std::atoi(argv[3]);
  std::vector<llama_token> prompt;
  for (int i = 4; i < argc; ++i) prompt.push_back(static_cast<llama_token>(std::atoi(argv[i])));

  llama_backend_init();
  llama_model_params mp = llama_model_default_params();
  llama_model* model = llama_model_load_from_file(path, mp);
  if (!model) {
    std::fprintf(stderr, "llama.cpp could not load %s\n", path);
    return 1;
  }
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = static_cast<uint32_t>(prompt.size() + n_new + 8);
  cp.n_batch = cp.n_ctx;
  cp.n_ubatch = cp.n_ctx;
  cp.n_threads = threads;
  cp.n_threads_batch = threads;
  cp.no_perf = true;
  llama_context* ctx = llama_init_from_model(model, cp);
  if (!ctx) {
    std::fprintf(stderr, "llama.cpp could not create a context for %s\n", path);
    return 1;
  }
  const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  std::vector<int> generated;
  llama_batch batch = llama_batch_get_one(prompt.data(), static_cast<int32_t>(prompt.size()));
  llama_token next = 0;
  for (int step = 0; step < n_new; ++step) {
    if (llama_decode(ctx, batch) != 0) {
      std::fprintf(stderr, "llama_decode failed at step %d\n", step);
      return 1;
    }
    next = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
    generated.push_back(next);
    batch = llama_batch_get_one(&next, 1);
  }
  std::string out = "{\"generated\": [";
  for (size_t i = 0; i < generated.size(); ++i) out += (i ? ", " : "") + std::to_string(generated[i]);
  out += "]}";
  std::printf("%s\n", out.c_str());
  llama_free(ctx);
  llama_model_free(model);
  llama_backend_free();
  return 0;
}
