// One persistent thread pool for the engine: workers spin briefly on new work, then sleep.
//
// parallel_for(n, fn): fn(i) for i in [0, n), shared by the workers and the calling thread (so a
// pool of `threads` uses threads-1 workers plus the caller: never oversubscribed). submit(job) runs
// job on the pool's own driver thread and returns at once; wait() joins it - this is how Python
// overlaps GPU work with a CPU MoE call.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tandem {

class ThreadPool {
public:
    explicit ThreadPool(int threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int threads() const { return static_cast<int>(workers_.size()) + 1; }

    // fn(task, thread_index) for task in [0, n_tasks); thread_index in [0, threads()).
    void parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& fn);

    // Run `job` asynchronously on the driver thread (it may call parallel_for); one job at a time.
    void submit(std::function<void()> job);
    // Block until the submitted job (if any) finished; rethrows its exception.
    void wait();
    bool busy() const { return job_running_.load(std::memory_order_acquire); }

private:
    void stop_threads();  // stop and join the workers and the driver (the destructor, a failed constructor)
    void worker_loop(int index);
    void driver_loop();
    void run_tasks(int thread_index);
    std::vector<std::thread> workers_;
    std::mutex call_mutex_;  // one parallel_for at a time
    // The current parallel_for: one word holds its generation, task count and next task, so a thread claims a
    // task with one compare-exchange that fails if the call it read is over. The caller waits for its tasks
    // to be done, not for every worker to check in: a worker the OS has not scheduled yet (more threads
    // than free CPUs) costs nothing once the others have run its share.
    std::atomic<uint64_t> work_{0};
    std::atomic<const std::function<void(int64_t, int)>*> fn_{nullptr};
    std::atomic<int64_t> done_{0};
    std::atomic<bool> stop_{false};
    std::mutex sleep_mutex_;
    std::condition_variable wake_cv_, done_cv_;

    // async driver
    std::thread driver_;
    std::mutex job_mutex_;
    std::condition_variable job_cv_, job_done_cv_;
    std::function<void()> job_;
    std::atomic<bool> job_running_{false};
    std::exception_ptr job_error_;
};

}  // namespace tandem
