// Timing driver for chatglm.cpp (https://github.com/li-plus/chatglm.cpp), built against the library
// of an unpacked chatglm-cpp source tree by benchmarks/vs_chatglm_cpp.py; nothing of chatglm.cpp is
// vendored here. It feeds a fixed list of token ids (no tokenizer, no chat template), decodes
// greedily, and prints one JSON line: the generated ids and the time of the prompt pass and of every
// decode step, taken by a streamer at each token as chatglm.cpp's own PerfStreamer does. The model
// is loaded once and the generation repeated ROUNDS times (the first round also warms the pages of
// the memory-mapped weights).
//
//   driver MODEL.bin N_NEW ROUNDS ID [ID ...]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "chatglm.h"

namespace {

class StepTimer : public chatglm::BaseStreamer {
 public:
  void put(const std::vector<int> &ids) override {
    stamps.push_back(std::chrono::steady_clock::now());
    if (!prompt_seen) {
      prompt_seen = true;  // the prompt itself, before the first forward pass
      return;
    }
    for (int id : ids) generated.push_back(id);
  }
  void end() override {}

  bool prompt_seen = false;
  std::vector<std::chrono::steady_clock::time_point> stamps;
  std::vector<int> generated;
};

}  // namespace

int main(int argc, char **argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s MODEL.bin N_NEW ROUNDS ID [ID ...]\n", argv[0]);
    return 2;
  }
  const std::string path = argv[1];
  const int n_new = std::atoi(argv[2]);
  const int rounds = std::atoi(argv[3]);
  std::vector<int> ids;
  for (int i = 4; i < argc; i++) ids.push_back(std::atoi(argv[i]));
  const int max_length = static_cast<int>(ids.size()) + n_new + 1;

  const auto t_load = std::chrono::steady_clock::now();
  chatglm::Pipeline pipeline(path, max_length);
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();

  // max_context_length only matters past max_length; do_sample = false: greedy (argmax).
  chatglm::GenerationConfig config(max_length, n_new, max_length, /*do_sample=*/false);
  std::printf("{\"load_s\": %.6f, \"rounds\": [", load_s);
  for (int r = 0; r < rounds; r++) {
    StepTimer timer;
    pipeline.generate(ids, std::nullopt, config, &timer);
    // step_s[0]: the prompt pass and the first token; then one entry per decode step.
    std::printf("%s{\"generated\": [", r ? ", " : "");
    for (size_t i = 0; i < timer.generated.size(); i++) std::printf("%s%d", i ? ", " : "", timer.generated[i]);
    std::printf("], \"step_s\": [");
    for (size_t i = 1; i < timer.stamps.size(); i++)
      std::printf("%s%.6f", i > 1 ? ", " : "",
                  std::chrono::duration<double>(timer.stamps[i] - timer.stamps[i - 1]).count());
    std::printf("]}");
  }
  std::printf("]}\n");
  return 0;
}
