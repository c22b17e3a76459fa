// An environment variable for the scope of a test: the previous value (or its absence) comes back at the end.
#pragma once

#include <cstdlib>
#include <string>

namespace harness {

class ScopedEnv {
 public:
  // Saves `name` only: the test may change it; the destructor restores it.
  explicit ScopedEnv(const char* name) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
  }
  // Saves `name`, then sets it to `value` (nullptr: unsets it).
  ScopedEnv(const char* name, const char* value) : ScopedEnv(name) {
    if (value != nullptr)
      setenv(name, value, 1);
    else
      unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_)
      setenv(name_.c_str(), old_.c_str(), 1);
    else
      unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::string old_;
  bool had_ = false;
};

}  // namespace harness
