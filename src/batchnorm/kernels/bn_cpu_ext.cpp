/* The CPU kernel's entry points as one C++ call each: checks, output allocation and the kernel
 * call of `cpu.py`'s eval_forward / train_forward_update / train_backward, without Python
 * (`eval`, `train`, `backward`), and functional.batch_norm's whole training call (`train_step`),
 * with autograd as one C++ autograd node (`Train`); the same for act.py's BN + ReLU layers
 * (`act_train_step` with the node `TrainRelu`, `act_eval`).
 *
 * Why: a batch-norm call's fixed cost is mostly its Python layers and the ctypes call (argument
 * conversion), and when a convolution has just streamed megabytes through the caches, those
 * layers run cold: ~85 us for our eval on a tiny tensor against ~55 us for torch's
 * F.batch_norm, while this file's eval costs ~23 us (2-core EPYC, benchmarks/kernel_notes.md,
 * "Fourth session"). In a warm loop: 2.3 us against 5.0 us for F.batch_norm.
 *
 * Contract: every entry point returns None when it cannot take the call as given (another
 * dtype, device or layout, a tensor subclass, a shape or value the Python path rejects). The
 * caller then runs the Python path, which raises the documented errors or converts. So nothing
 * here raises for bad input; a failed scratch allocation in the kernel raises MemoryError.
 *
 * Built by cpu.py against the installed torch (its headers and libraries) and linked to the C
 * kernel's shared library, which the process has already loaded through ctypes: one copy, so
 * the cache-size setting is shared. */
#include <ATen/Parallel.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/CPUAllocator.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

extern "C" {
int bn_abi_version(void);
int bn_train_forward(int dt, const void *x, void *y, int64_t A, int64_t C, int64_t B, const float *w, const float *b,
                     double eps, float *mean_out, float *var_out, float *invstd_out, float *running_mean,
                     float *running_var, double momentum, int nthreads);
int bn_train_backward(int dt, const void *dy, const void *x, void *dx, int64_t A, int64_t C, int64_t B, const float *w,
                      const float *mean, const float *invstd, float *s1_out, float *s2_out, int nthreads);
int bn_eval(int dt, const void *x, void *y, int64_t A, int64_t C, int64_t B, const float *mean, const float *var,
            const float *w, const float *b, double eps, int nthreads);
int bn_train_forward_relu(int dt, const void *x, const void *res, void *y, int64_t A, int64_t C, int64_t B,
                          const float *w, const float *b, double eps, float *mean_out, float *var_out,
                          float *invstd_out, float *running_mean, float *running_var, double momentum,
                          float *scale_shift, int nthreads);
int bn_train_backward_relu(int dt, const void *dy, const void *x, void *dx, int64_t A, int64_t C, int64_t B,
                           const float *w, const float *mean, const float *invstd, const float *scale,
                           const float *shift, float *s1_out, float *s2_out, int nthreads);
int bn_eval_relu(int dt, const void *x, const void *res, void *y, int64_t A, int64_t C, int64_t B, const float *mean,
                 const float *var, const float *w, const float *b, double eps, int nthreads);
int bn_ghost_forward(int dt, const void *x, void *y, int64_t A, int64_t C, int64_t B, int64_t Ag, const float *w,
                     const float *b, double eps, float *mean_out, float *var_out, float *invstd_out,
                     double *total_mean, double *total_m2, int nthreads);
int bn_ghost_backward(int dt, const void *dy, const void *x, void *dx, int64_t A, int64_t C, int64_t B, int64_t Ag,
                      const float *w, const float *mean, const float *invstd, float *s1_out, float *s2_out,
                      int nthreads);
int bn_update_running_unbiased(int f64, int64_t C, const void *mean, const void *unbiased, float *running_mean,
                               float *running_var, double momentum);
}

namespace {

using Opt = std::optional<at::Tensor>;

struct Layout {
    int64_t A, C, B;
};

/* A tensor with real CPU memory behind it: not a subclass with its own dispatch (fake tensors
 * of torch.compile, functional tensors), not a negative or conjugate view. */
bool plain_cpu(const at::Tensor &t) {
    if (!t.defined() || !t.is_cpu() || t.layout() != at::kStrided || !t.has_storage()) return false;
    const auto keys = t.key_set();
    if (keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::Functionalize)) return false;
    return !t.is_neg() && !t.is_conj();
}

/* The kernel's dtype code (cpu._DTYPES), or -1. */
int dtype_code(const at::Tensor &t) {
    switch (t.scalar_type()) {
        case at::kFloat: return 0;
        case at::kBFloat16: return 1;
        default: return -1;
    }
}

/* cpu._layout: (A, C, B) if x reads in memory order as a contiguous (A, C, B) block. */
std::optional<Layout> layout(const at::Tensor &x, int64_t axis) {
    const int64_t nd = x.dim();
    if (nd < 2 || x.numel() == 0 || axis < -nd || axis >= nd) return std::nullopt;
    axis = axis < 0 ? axis + nd : axis;
    const auto sizes = x.sizes();
    const auto strides = x.strides();
    const int64_t C = sizes[axis];
    if (x.is_contiguous()) {
        int64_t A = 1, B = 1;
        for (int64_t d = 0; d < axis; d++) A *= sizes[d];
        for (int64_t d = axis + 1; d < nd; d++) B *= sizes[d];
        return Layout{A, C, B};
    }
    // Dense: the dims of size > 1, by increasing stride, each stride the product of the sizes inside it.
    if (nd > 64) return std::nullopt;
    int64_t dims[64], n = 0;
    for (int64_t d = 0; d < nd; d++)
        if (sizes[d] != 1) dims[n++] = d;
    std::stable_sort(dims, dims + n, [&](int64_t a, int64_t b) { return strides[a] < strides[b]; });
    int64_t expected = 1;
    for (int64_t i = 0; i < n; i++) {
        if (strides[dims[i]] != expected) return std::nullopt;
        expected *= sizes[dims[i]];
    }
    if (C == 1) return Layout{1, 1, x.numel()};
    int64_t B = 1;
    for (int64_t i = 0; i < n; i++)
        if (strides[dims[i]] < strides[axis]) B *= sizes[dims[i]];
    return Layout{x.numel() / (B * C), C, B};
}

/* A float32 (C,) contiguous CPU vector, as the kernel reads it. */
bool is_vector(const at::Tensor &t, int64_t C) {
    return plain_cpu(t) && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == C && t.is_contiguous();
}

/* An optional per-channel vector: absent (nullptr, true), usable (its data, true), or not (false). */
bool optional_vector(const Opt &t, int64_t C, const float **data) {
    *data = nullptr;
    if (!t.has_value()) return true;
    if (!is_vector(*t, C)) return false;
    *data = t->data_ptr<float>();
    return true;
}

/* x's layout if x is a plain float32/bfloat16 CPU tensor the kernel reads as it is. */
std::optional<Layout> kernel_layout(const at::Tensor &x, int64_t axis) {
    if (!plain_cpu(x) || dtype_code(x) < 0) return std::nullopt;
    return layout(x, axis);
}

bool wants_grad(std::initializer_list<const at::Tensor *> tensors) {
    if (!at::GradMode::is_enabled()) return false;
    for (const at::Tensor *t : tensors)
        if (t && t->defined() && t->requires_grad()) return true;
    return false;
}

/* Output memory: a bounded pool of the buffers of outputs that died.
 *
 * torch's CPU allocator takes a buffer of a megabyte or more from mmap and gives it back with
 * munmap, so each call's output is fresh memory: its first write page-faults, and the OS zeroes
 * every page before the kernel writes it. On the development VM that costs up to a third of a
 * training step in cache, and about as much on 100 MB tensors, where the zeroing is one more
 * pass over memory (benchmarks/kernel_notes.md, "Eleventh session").
 *
 * The pool keeps the buffers of freed outputs of POOL_MIN_BYTES and more, up to a limit in all
 * (cpu.py sets it from BATCHNORM_OUTPUT_POOL_MB; 0 turns the pool off). The next output of the
 * same byte size takes the most recently freed one: mapped already, and likely still cached.
 * Beyond the limit the oldest buffers are freed. Outputs are ordinary resizable tensors; only
 * their storage's allocator is this one. */
constexpr size_t POOL_MIN_BYTES = 256 << 10;

class OutputPool final : public c10::Allocator {
   public:
    c10::DataPtr allocate(size_t bytes) override {
        if (bytes < POOL_MIN_BYTES || limit_ == 0) return c10::GetCPUAllocator()->allocate(bytes);
        Block *block = take(bytes);
        if (!block) {
            void *data = nullptr;
            if (posix_memalign(&data, 64, bytes) != 0) throw std::bad_alloc();
            block = new Block{data, bytes};
        }
        return {block->data, block, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
    }

    void copy_data(void *dest, const void *src, size_t count) const override { std::memcpy(dest, src, count); }

    /* The most bytes the pool keeps; lowering it frees the oldest buffers at once. */
    void set_limit(size_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        limit_ = bytes;
        trim();
    }

    /* (bytes kept, buffers kept, limit). */
    std::tuple<size_t, size_t, size_t> state() {
        std::lock_guard<std::mutex> lock(mutex_);
        return {kept_, free_.size(), limit_.load()};
    }

    /* The pool outputs come from. A fork's child starts a new one: the parent's mutex may have been
     * held by a thread the child does not have. Pools are never deleted (storages point at them). */
    static OutputPool &current() {
        static const bool registered = [] {
            pthread_atfork(nullptr, nullptr, [] { pool_ = new OutputPool(pool_->limit_.load()); });
            return true;
        }();
        (void)registered;
        return *pool_;
    }

   private:
    struct Block {
        void *data;
        size_t bytes;
    };

    explicit OutputPool(size_t limit) : limit_(limit) {}

    Block *take(size_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto it = free_.rbegin(); it != free_.rend(); ++it)
            if ((*it)->bytes == bytes) {
                Block *block = *it;
                free_.erase(std::next(it).base());
                kept_ -= bytes;
                return block;
            }
        return nullptr;
    }

    /* The DataPtr's deleter: a dying output's buffer goes to the current pool. */
    static void release(void *ctx) { current().keep(static_cast<Block *>(ctx)); }

    void keep(Block *block) {
        std::lock_guard<std::mutex> lock(mutex_);
        free_.push_back(block);
        kept_ += block->bytes;
        trim();
    }

    void trim() {  // with mutex_ held
        size_t drop = 0;
        while (drop < free_.size() && kept_ > limit_) {
            kept_ -= free_[drop]->bytes;
            std::free(free_[drop]->data);
            delete free_[drop++];
        }
        free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(drop));
    }

    static OutputPool *pool_;
    std::mutex mutex_;
    std::vector<Block *> free_;  // oldest first
    size_t kept_ = 0;
    std::atomic<size_t> limit_;  // read without the mutex by allocate
};

OutputPool *OutputPool::pool_ = new OutputPool(0);  // off until cpu.py sets the limit

/* An output with x's strides (x is dense: kernel_layout, same_layout), its memory from the pool. */
at::Tensor output_like(const at::Tensor &x) {
    if (!x.is_non_overlapping_and_dense()) return at::empty_like(x, at::MemoryFormat::Preserve);
    return at::Tensor(at::detail::empty_strided_generic(x.sizes(), x.strides(), &OutputPool::current(),
                                                        c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type()));
}

at::Tensor float_vector(int64_t C) { return at::empty({C}, at::TensorOptions().dtype(at::kFloat)); }

/* 1: the kernel could not allocate its scratch memory (pybind11 raises MemoryError). */
void check_rc(int rc) {
    if (rc == 1) throw std::bad_alloc();
}

/* Whether dy can be read as x is: x's dtype and shape, the same strides on every dim of size > 1
 * (so the same memory order). */
bool same_layout(const at::Tensor &dy, const at::Tensor &x) {
    if (dy.scalar_type() != x.scalar_type() || dy.sizes() != x.sizes()) return false;
    if (dy.is_contiguous() && x.is_contiguous()) return true;
    for (int64_t d = 0; d < x.dim(); d++)
        if (x.size(d) != 1 && dy.stride(d) != x.stride(d)) return false;
    return true;
}

/* dy as the kernel reads it beside x: itself, or a copy in x's layout (cpu.in_layout_of). */
at::Tensor in_layout_of(const at::Tensor &dy, const at::Tensor &x) {
    return dy.is_cpu() && same_layout(dy, x) ? dy : output_like(x).copy_(dy);
}

/* A residual the kernel reads as it is beside x: absent, or a plain CPU tensor of x's dtype,
 * shape and memory order. */
bool residual_ok(const Opt &residual, const at::Tensor &x) {
    return !residual.has_value() || (plain_cpu(*residual) && same_layout(*residual, x));
}

/* Eval-mode BN: y = x * scale + shift, scale = w * (var + eps)^-1/2, shift = b - mean * scale (with
 * relu: relu(y + residual), bn_eval_relu).
 * None unless: no gradient is wanted, x is a plain float32/bfloat16 CPU tensor of a kernel
 * layout, mean and var are float32 (C,) contiguous, weight and bias the same or None. */
py::object eval_pass(const at::Tensor &x, bool relu, const Opt &residual, const Opt &mean, const Opt &var,
                     const Opt &weight, const Opt &bias, double eps, int64_t axis) {
    auto acb = kernel_layout(x, axis);
    if (!acb || !mean || !var || !residual_ok(residual, x)) return py::none();
    const int64_t C = acb->C;
    if (!is_vector(*mean, C) || !is_vector(*var, C)) return py::none();
    const float *w, *b;
    if (!optional_vector(weight, C, &w) || !optional_vector(bias, C, &b)) return py::none();
    const at::Tensor *r = residual ? &*residual : nullptr;
    if (wants_grad({&x, r, &*mean, &*var, weight ? &*weight : nullptr, bias ? &*bias : nullptr})) return py::none();
    at::Tensor y = output_like(x);
    const int dt = dtype_code(x), threads = at::get_num_threads();
    const float *mu = mean->const_data_ptr<float>(), *v = var->const_data_ptr<float>();
    int rc;
    {
        py::gil_scoped_release unlocked;
        rc = relu ? bn_eval_relu(dt, x.const_data_ptr(), r ? r->const_data_ptr() : nullptr, y.mutable_data_ptr(),
                                 acb->A, C, acb->B, mu, v, w, b, eps, threads)
                  : bn_eval(dt, x.const_data_ptr(), y.mutable_data_ptr(), acb->A, C, acb->B, mu, v, w, b, eps, threads);
    }
    check_rc(rc);
    return py::cast(y);
}

py::object eval(const at::Tensor &x, const Opt &mean, const Opt &var, const Opt &weight, const Opt &bias, double eps,
                int64_t axis) {
    return eval_pass(x, false, std::nullopt, mean, var, weight, bias, eps, axis);
}

/* A running-statistics buffer the kernel may update in place (cpu.can_update). */
bool can_update(const Opt &t, int64_t C) { return t.has_value() && is_vector(*t, C) && !t->requires_grad(); }

/* What a training forward hands the kernel. */
struct TrainArgs {
    Layout acb;
    const float *w, *b;
    float *running_mean, *running_var;  // both null when none were given
    c10::TensorImpl *mean_impl, *var_impl;  // their tensors, for the version counters

    /* The running statistics were written in place, as torch's in-place ops would: autograd's
     * checks see it. */
    void bump_running() const {
        mean_impl->bump_version();
        var_impl->bump_version();
    }
};

/* The training forward's checks: x and the parameters as for eval, running_mean and running_var
 * both None or both float32 (C,) contiguous buffers without grad, eps > 0, 0 <= momentum <= 1,
 * more than one value per channel. Anything else: nullopt (the Python path says why). */
std::optional<TrainArgs> train_args(const at::Tensor &x, const Opt &weight, const Opt &bias, const Opt &running_mean,
                                    const Opt &running_var, double eps, double momentum, int64_t axis) {
    auto acb = kernel_layout(x, axis);
    if (!acb || !(eps > 0) || !(momentum >= 0 && momentum <= 1) || acb->A * acb->B < 2) return std::nullopt;
    TrainArgs a{*acb, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    if (!optional_vector(weight, acb->C, &a.w) || !optional_vector(bias, acb->C, &a.b)) return std::nullopt;
    if (running_mean.has_value() != running_var.has_value()) return std::nullopt;
    if (running_mean.has_value()) {
        if (!can_update(running_mean, acb->C) || !can_update(running_var, acb->C)) return std::nullopt;
        a.running_mean = running_mean->mutable_data_ptr<float>();
        a.running_var = running_var->mutable_data_ptr<float>();
        a.mean_impl = running_mean->unsafeGetTensorImpl();
        a.var_impl = running_var->unsafeGetTensorImpl();
    }
    return a;
}

/* What the BN + ReLU forward adds: the residual (its data in x's layout, or null) and where the
 * apply pass's scale and shift go (2 * C floats, for the gated backward). */
struct Relu {
    const void *residual;
    float *scale_shift;
};

/* The kernel's training forward into a new y; mean, var, invstd: float32 (C,) outputs; with
 * relu, y = relu(BN(x) + residual) (bn_train_forward_relu). Returns `updated`: 1 if the running
 * statistics were updated in the same call, 0 if the batch was not finite (nothing written), -1
 * if none were given. Releases the GIL (callers hold it). */
int forward_kernel(const at::Tensor &x, const TrainArgs &a, double eps, double momentum, at::Tensor &y, float *mean,
                   float *var, float *invstd, const Relu *relu = nullptr) {
    y = output_like(x);
    const int dt = dtype_code(x), threads = at::get_num_threads();
    int rc;
    {
        py::gil_scoped_release unlocked;
        if (relu)
            rc = bn_train_forward_relu(dt, x.const_data_ptr(), relu->residual, y.mutable_data_ptr(), a.acb.A, a.acb.C,
                                       a.acb.B, a.w, a.b, eps, mean, var, invstd, a.running_mean, a.running_var,
                                       momentum, relu->scale_shift, threads);
        else
            rc = bn_train_forward(dt, x.const_data_ptr(), y.mutable_data_ptr(), a.acb.A, a.acb.C, a.acb.B, a.w, a.b,
                                  eps, mean, var, invstd, a.running_mean, a.running_var, momentum, threads);
    }
    check_rc(rc);
    if (!a.running_mean) return -1;
    if (rc == 0) a.bump_running();
    return rc == 0 ? 1 : 0;
}

/* Training-mode forward with the batch statistics: (y, mean, var, invstd, updated), all as in
 * `forward_kernel`; None where `train_args` declines. */
py::object train(const at::Tensor &x, const Opt &weight, const Opt &bias, const Opt &running_mean,
                 const Opt &running_var, double eps, double momentum, int64_t axis) {
    auto a = train_args(x, weight, bias, running_mean, running_var, eps, momentum, axis);
    if (!a) return py::none();
    const int64_t C = a->acb.C;
    at::Tensor y, mean = float_vector(C), var = float_vector(C), invstd = float_vector(C);
    const int updated = forward_kernel(x, *a, eps, momentum, y, mean.mutable_data_ptr<float>(),
                                       var.mutable_data_ptr<float>(), invstd.mutable_data_ptr<float>());
    return py::make_tuple(y, mean, var, invstd, updated);
}


/* The kernel's backward: dx (undefined unless need_dx), s1 = sum(dy), s2 = sum(dy * (x - mean)).
 * dy in x's memory order; mean and invstd float32 (C,); w float32 (C,) or null. Does not touch
 * the GIL (Python callers release it around the call). */
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_kernel(const at::Tensor &dy, const at::Tensor &x, Layout acb,
                                                               const float *w, const at::Tensor &mean,
                                                               const at::Tensor &invstd, bool need_dx) {
    at::Tensor dx = need_dx ? output_like(x) : at::Tensor(), s1 = float_vector(acb.C), s2 = float_vector(acb.C);
    const int rc = bn_train_backward(dtype_code(x), dy.const_data_ptr(), x.const_data_ptr(),
                                     need_dx ? dx.mutable_data_ptr() : nullptr, acb.A, acb.C, acb.B, w,
                                     mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(),
                                     s1.mutable_data_ptr<float>(), s2.mutable_data_ptr<float>(),
                                     at::get_num_threads());
    check_rc(rc);
    return {dx, s1, s2};
}

/* Training-mode backward: (dx or None, s1, s2), as `backward_kernel`. None unless dy has x's
 * layout (`same_layout`), weight is None or as for eval, and mean and invstd are float32 (C,)
 * contiguous. */
py::object backward(const at::Tensor &dy, const at::Tensor &x, const Opt &weight, const at::Tensor &mean,
                    const at::Tensor &invstd, int64_t axis, bool need_dx) {
    auto acb = kernel_layout(x, axis);
    if (!acb || !plain_cpu(dy) || !same_layout(dy, x)) return py::none();
    const float *w;
    if (!optional_vector(weight, acb->C, &w) || !is_vector(mean, acb->C) || !is_vector(invstd, acb->C))
        return py::none();
    at::Tensor dx, s1, s2;
    {
        py::gil_scoped_release unlocked;
        std::tie(dx, s1, s2) = backward_kernel(dy, x, *acb, w, mean, invstd, need_dx);
    }
    return py::make_tuple(need_dx ? py::cast(dx) : py::none(), s1, s2);
}

/* ---------------------------------------------------------------- training with autograd */

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/* What a BN node's backward reads back: the saved x, weight (undefined if None), mean and invstd,
 * and which gradients autograd wants. needs_input_grad counts the tensor arguments given: x, then
 * weight and bias if not None (weight_index: where they start, 2 after a residual). */
struct Saved {
    at::Tensor x, weight, mean, invstd;
    bool need_x, need_w, need_b;
};

Saved saved_for_backward(AutogradContext *ctx, int64_t weight_index = 1) {
    const auto saved = ctx->get_saved_variables();
    Saved s{saved[0], saved[1], saved[2], saved[3], ctx->needs_input_grad(0), false, false};
    s.need_w = s.weight.defined() && ctx->needs_input_grad(weight_index);
    s.need_b = ctx->saved_data["has_bias"].toBool() &&
               ctx->needs_input_grad(weight_index + (s.weight.defined() ? 1 : 0));
    return s;
}

/* A (C,) vector shaped to broadcast along `axis` of an nd tensor. */
at::Tensor along(const at::Tensor &v, int64_t nd, int64_t axis) {
    std::vector<int64_t> shape(nd, 1);
    shape[axis] = -1;
    return v.view(shape);
}

/* Training-mode BN as one autograd node: the kernel's forward (running statistics updated in the
 * same call) and the kernel's backward, or, when the backward itself is differentiated
 * (create_graph=True), the backward recomputed from x with differentiable ops, as the Python
 * path's _backward_differentiable:
 *     dx = w * invstd / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat)),
 *     dweight = sum(dy * x_hat), dbias = sum(dy).
 * weight and bias are optional; `args` carries the layout, their data and the running buffers. */
struct Train : public torch::autograd::Function<Train> {
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const Opt &weight, const Opt &bias,
                              const TrainArgs &args, int64_t axis, double eps, double momentum, int *updated) {
        const int64_t C = args.acb.C;
        at::Tensor y, mean = float_vector(C), var = float_vector(C), invstd = float_vector(C);
        *updated = forward_kernel(x, args, eps, momentum, y, mean.mutable_data_ptr<float>(),
                                  var.mutable_data_ptr<float>(), invstd.mutable_data_ptr<float>());
        ctx->save_for_backward({x, weight ? *weight : at::Tensor(), mean, invstd});
        ctx->saved_data["A"] = args.acb.A;
        ctx->saved_data["B"] = args.acb.B;
        ctx->saved_data["axis"] = axis;
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["has_bias"] = bias.has_value();
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const auto [x, weight, mean, invstd, need_x, need_w, need_b] = saved_for_backward(ctx);
        const at::Tensor &dy = grads[0];
        at::Tensor dx, dw, db;
        if (at::GradMode::is_enabled()) {
            std::tie(dx, dw, db) = differentiable_backward(ctx, x, weight, dy);
        } else {
            const Layout acb{ctx->saved_data["A"].toInt(), mean.size(0), ctx->saved_data["B"].toInt()};
            // the kernel reads dy in x's memory order (the autograd engine runs this without the GIL)
            const at::Tensor g = in_layout_of(dy, x);
            const float *w = weight.defined() ? weight.const_data_ptr<float>() : nullptr;
            at::Tensor s1, s2;
            std::tie(dx, s1, s2) = backward_kernel(g, x, acb, w, mean, invstd, need_x);
            if (need_w) dw = s2 * invstd;
            if (need_b) db = s1;
        }
        // one gradient per forward argument: x, weight, bias, then the non-tensor arguments
        return {need_x ? dx : at::Tensor(), need_w ? dw : at::Tensor(), need_b ? db : at::Tensor(),
                at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }

    static std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_backward(AutogradContext *ctx,
                                                                                  const at::Tensor &x,
                                                                                  const at::Tensor &weight,
                                                                                  const at::Tensor &dy) {
        const int64_t nd = x.dim(), axis = ctx->saved_data["axis"].toInt();
        const double eps = ctx->saved_data["eps"].toDouble();
        std::vector<int64_t> dims;
        for (int64_t d = 0; d < nd; d++)
            if (d != axis) dims.push_back(d);
        const at::Tensor xf = x.to(at::kFloat), g = dy.to(at::kFloat);
        const double m = static_cast<double>(x.numel() / x.size(axis));
        const at::Tensor mean = xf.mean(dims);
        const at::Tensor centred = xf - along(mean, nd, axis);
        const at::Tensor invstd = (centred.square().mean(dims) + eps).rsqrt();
        const at::Tensor x_hat = centred * along(invstd, nd, axis);
        const at::Tensor s1 = g.sum(dims), s2 = (g * x_hat).sum(dims);
        const at::Tensor k = weight.defined() ? invstd * weight : invstd;
        at::Tensor dx = along(k / m, nd, axis) * (g * m - along(s1, nd, axis) - x_hat * along(s2, nd, axis));
        return {dx.to(x.scalar_type()), s2, s1};
    }
};

/* A whole training step of functional.batch_norm in C++: (y, updated), updated as for `train`.
 * With autograd (a gradient is wanted) y comes from the `Train` node, else from the kernel
 * alone. None when `train` would decline. */
py::object train_step(const at::Tensor &x, const Opt &weight, const Opt &bias, const Opt &running_mean,
                      const Opt &running_var, double eps, double momentum, int64_t axis) {
    auto a = train_args(x, weight, bias, running_mean, running_var, eps, momentum, axis);
    if (!a) return py::none();
    int updated;
    at::Tensor y;
    if (wants_grad({&x, weight ? &*weight : nullptr, bias ? &*bias : nullptr})) {
        y = Train::apply(x, weight, bias, *a, axis < 0 ? axis + x.dim() : axis, eps, momentum, &updated);
    } else {
        std::vector<float> stats(3 * a->acb.C);  // mean, var, invstd: the kernel writes them, nobody reads them
        float *p = stats.data();
        updated = forward_kernel(x, *a, eps, momentum, y, p, p + a->acb.C, p + 2 * a->acb.C);
    }
    return py::make_tuple(y, updated);
}

/* ---------------------------------------------------------------- BN + ReLU (act.py's layers) */

/* Eval-mode relu(BN(x) + residual) in one pass (bn_eval_relu); None as `eval`, or for a residual
 * that fails `residual_ok`. */
py::object act_eval(const at::Tensor &x, const Opt &residual, const Opt &mean, const Opt &var, const Opt &weight,
                    const Opt &bias, double eps, int64_t axis) {
    return eval_pass(x, true, residual, mean, var, weight, bias, eps, axis);
}

/* Training relu(BN(x) + residual) as one autograd node, act.py's _CpuAct in C++: the fused
 * forward; backward without a residual BN's backward with dy gated by the forward's ReLU test
 * recomputed from x (bn_train_backward_relu), with one g = dy where y > 0 (the residual's
 * gradient) and BN's backward of g; with create_graph=True g = dy * mask and Train's
 * differentiable backward. */
struct TrainRelu : public torch::autograd::Function<TrainRelu> {
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const Opt &residual, const Opt &weight,
                              const Opt &bias, const TrainArgs &args, int64_t axis, double eps, double momentum,
                              int *updated) {
        const int64_t C = args.acb.C;
        at::Tensor y, mean = float_vector(C), var = float_vector(C), invstd = float_vector(C);
        at::Tensor gate = at::empty({2, C}, at::TensorOptions().dtype(at::kFloat));
        const Relu relu{residual ? residual->const_data_ptr() : nullptr, gate.mutable_data_ptr<float>()};
        *updated = forward_kernel(x, args, eps, momentum, y, mean.mutable_data_ptr<float>(),
                                  var.mutable_data_ptr<float>(), invstd.mutable_data_ptr<float>(), &relu);
        ctx->save_for_backward({x, weight ? *weight : at::Tensor(), mean, invstd, residual ? y : gate});
        ctx->saved_data["A"] = args.acb.A;
        ctx->saved_data["B"] = args.acb.B;
        ctx->saved_data["axis"] = axis;
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["has_residual"] = residual.has_value();
        ctx->saved_data["has_bias"] = bias.has_value();
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const bool has_residual = ctx->saved_data["has_residual"].toBool();
        const auto [x, weight, mean, invstd, need_x, need_w, need_b] = saved_for_backward(ctx, has_residual ? 2 : 1);
        const bool need_r = has_residual && ctx->needs_input_grad(1);
        const at::Tensor gate_or_y = ctx->get_saved_variables()[4], &dy = grads[0];
        const int64_t nd = x.dim(), axis = ctx->saved_data["axis"].toInt();
        at::Tensor dx, dw, db, g;
        if (at::GradMode::is_enabled()) {
            at::Tensor passed;
            if (has_residual) {
                passed = gate_or_y > 0;
            } else {  // the forward's ReLU test from torch ops (two roundings: it may differ where y ~ 0)
                const at::Tensor scale = along(gate_or_y[0], nd, axis), shift = along(gate_or_y[1], nd, axis);
                passed = (x.to(at::kFloat) - along(mean, nd, axis)) * scale + shift > 0;
            }
            g = dy * passed;
            std::tie(dx, dw, db) = Train::differentiable_backward(ctx, x, weight, g);
        } else {
            const Layout acb{ctx->saved_data["A"].toInt(), mean.size(0), ctx->saved_data["B"].toInt()};
            const float *w = weight.defined() ? weight.const_data_ptr<float>() : nullptr;
            at::Tensor s1, s2;
            if (has_residual) {
                g = output_like(x);
                at::threshold_backward_out(g, dy, gate_or_y, 0);
                std::tie(dx, s1, s2) = backward_kernel(g, x, acb, w, mean, invstd, need_x);
            } else {
                const at::Tensor d = in_layout_of(dy, x);
                dx = need_x ? output_like(x) : at::Tensor();
                s1 = float_vector(acb.C);
                s2 = float_vector(acb.C);
                const float *ss = gate_or_y.const_data_ptr<float>();
                check_rc(bn_train_backward_relu(dtype_code(x), d.const_data_ptr(), x.const_data_ptr(),
                                                need_x ? dx.mutable_data_ptr() : nullptr, acb.A, acb.C, acb.B, w,
                                                mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(), ss,
                                                ss + acb.C, s1.mutable_data_ptr<float>(),
                                                s2.mutable_data_ptr<float>(), at::get_num_threads()));
            }
            if (need_w) dw = s2 * invstd;
            if (need_b) db = s1;
        }
        // one gradient per forward argument: x, residual, weight, bias, then the non-tensor arguments
        return {need_x ? dx : at::Tensor(), need_r ? g : at::Tensor(), need_w ? dw : at::Tensor(),
                need_b ? db : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
};

/* act.py's training step in C++: (y, updated), y = relu(BN(x) + residual), updated as for
 * `train`. With autograd (a gradient is wanted) y comes from the `TrainRelu` node, else from the
 * kernel alone. None where `train_args` or `residual_ok` declines. */
py::object act_train_step(const at::Tensor &x, const Opt &residual, const Opt &weight, const Opt &bias,
                          const Opt &running_mean, const Opt &running_var, double eps, double momentum, int64_t axis) {
    auto a = train_args(x, weight, bias, running_mean, running_var, eps, momentum, axis);
    if (!a || !residual_ok(residual, x)) return py::none();
    int updated;
    at::Tensor y;
    const at::Tensor *r = residual ? &*residual : nullptr;
    if (wants_grad({&x, r, weight ? &*weight : nullptr, bias ? &*bias : nullptr})) {
        y = TrainRelu::apply(x, residual, weight, bias, *a, axis < 0 ? axis + x.dim() : axis, eps, momentum,
                             &updated);
    } else {
        std::vector<float> scratch(5 * a->acb.C);  // mean, var, invstd, scale, shift: nobody reads them
        float *p = scratch.data();
        const Relu relu{r ? r->const_data_ptr() : nullptr, p + 3 * a->acb.C};
        updated = forward_kernel(x, *a, eps, momentum, y, p, p + a->acb.C, p + 2 * a->acb.C, &relu);
    }
    return py::make_tuple(y, updated);
}

/* ---------------------------------------------------------------- ghost batches */

/* Ghost batches of k samples along axis 0, as _kernel_variants.ghost_applies and ghost_train
 * take them: axis 0 outermost in memory (each ghost batch a dense block of `rows` rows of the
 * (A, C, B) view), the channels elsewhere, and more than one value per channel in every ghost
 * batch (else the Python path raises). */
struct GhostShape {
    int64_t rows, G;
};

std::optional<GhostShape> ghost_shape(const at::Tensor &x, const Layout &acb, int64_t axis, int64_t k) {
    const int64_t nd = x.dim(), N = x.size(0);
    axis = axis < 0 ? axis + nd : axis;
    if (axis == 0 || k < 1 || !(N == 1 || x.stride(0) * N == x.numel())) return std::nullopt;
    const int64_t per = x.numel() / (N * x.size(axis)), G = (N + k - 1) / k;
    if ((N - (G - 1) * k) * per < 2) return std::nullopt;
    return GhostShape{k * (acb.A / N), G};
}

/* Training BN over ghost batches as one autograd node: the kernel's forward of every ghost batch
 * in one call (each with its own statistics) and its backward; dweight and dbias add up over the
 * ghost batches. No double backward, as the Python path (`_GhostTrain`). */
struct GhostTrain : public torch::autograd::Function<GhostTrain> {
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const Opt &weight, const Opt &bias,
                              const TrainArgs &args, GhostShape ghost, double eps, double *total_mean,
                              double *total_m2) {
        at::Tensor y, mean, invstd;
        ghost_kernel(x, args, ghost, eps, y, mean, invstd, total_mean, total_m2);
        ctx->save_for_backward({x, weight ? *weight : at::Tensor(), mean, invstd});
        ctx->saved_data["A"] = args.acb.A;
        ctx->saved_data["B"] = args.acb.B;
        ctx->saved_data["rows"] = ghost.rows;
        ctx->saved_data["has_bias"] = bias.has_value();
        return y;
    }

    /* y, and mean, invstd (G, C) into new tensors; the whole batch's float64 mean and M2 into
     * total_mean, total_m2. Releases the GIL (callers hold it). */
    static void ghost_kernel(const at::Tensor &x, const TrainArgs &a, GhostShape ghost, double eps, at::Tensor &y,
                             at::Tensor &mean, at::Tensor &invstd, double *total_mean, double *total_m2) {
        const auto options = at::TensorOptions().dtype(at::kFloat);
        y = output_like(x);
        mean = at::empty({ghost.G, a.acb.C}, options);
        invstd = at::empty({ghost.G, a.acb.C}, options);
        at::Tensor var = at::empty({ghost.G, a.acb.C}, options);
        const int dt = dtype_code(x), threads = at::get_num_threads();
        int rc;
        {
            py::gil_scoped_release unlocked;
            rc = bn_ghost_forward(dt, x.const_data_ptr(), y.mutable_data_ptr(), a.acb.A, a.acb.C, a.acb.B, ghost.rows,
                                  a.w, a.b, eps, mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(),
                                  invstd.mutable_data_ptr<float>(), total_mean, total_m2, threads);
        }
        check_rc(rc);
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        if (at::GradMode::is_enabled())
            throw std::runtime_error(
                "double backward (create_graph=True) is supported for plain batch_norm only, not with mask, "
                "virtual_batch_size, renorm or process_group");
        const auto [x, weight, mean, invstd, need_x, need_w, need_b] = saved_for_backward(ctx);
        const at::Tensor &dy = grads[0];
        const int64_t A = ctx->saved_data["A"].toInt(), B = ctx->saved_data["B"].toInt(), C = mean.size(1);
        const at::Tensor g = in_layout_of(dy, x);
        at::Tensor dx = need_x ? output_like(x) : at::Tensor();
        at::Tensor s1 = at::empty_like(mean), s2 = at::empty_like(mean);
        check_rc(bn_ghost_backward(dtype_code(x), g.const_data_ptr(), x.const_data_ptr(),
                                   need_x ? dx.mutable_data_ptr() : nullptr, A, C, B, ctx->saved_data["rows"].toInt(),
                                   weight.defined() ? weight.const_data_ptr<float>() : nullptr,
                                   mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(),
                                   s1.mutable_data_ptr<float>(), s2.mutable_data_ptr<float>(), at::get_num_threads()));
        // over the ghost batches: dbias = sum(dy), dweight = sum(dy * x_hat), x_hat with each one's invstd
        return {need_x ? dx : at::Tensor(), need_w ? (s2 * invstd).sum(0) : at::Tensor(),
                need_b ? s1.sum(0) : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                at::Tensor()};
    }
};

/* functional.batch_norm's training call with virtual_batch_size=k (alone) in C++: (y, updated),
 * updated as for `train` (the running statistics from the whole batch's mean and unbiased
 * variance, merged from the ghost batches' moments, as the Python path). With autograd y comes
 * from the `GhostTrain` node. None where `train_args` or `ghost_shape` declines. */
py::object ghost_train_step(const at::Tensor &x, const Opt &weight, const Opt &bias, const Opt &running_mean,
                            const Opt &running_var, double eps, double momentum, int64_t axis, int64_t k) {
    auto a = train_args(x, weight, bias, running_mean, running_var, eps, momentum, axis);
    if (!a) return py::none();
    auto ghost = ghost_shape(x, a->acb, axis, k);
    if (!ghost) return py::none();
    const int64_t C = a->acb.C;
    std::vector<double> totals(2 * C);  // the whole batch's mean and M2, then the unbiased variance
    at::Tensor y;
    if (wants_grad({&x, weight ? &*weight : nullptr, bias ? &*bias : nullptr})) {
        y = GhostTrain::apply(x, weight, bias, *a, *ghost, eps, totals.data(), totals.data() + C);
    } else {
        at::Tensor mean, invstd;
        GhostTrain::ghost_kernel(x, *a, *ghost, eps, y, mean, invstd, totals.data(), totals.data() + C);
    }
    if (!a->running_mean) return py::make_tuple(y, -1);
    const double n = static_cast<double>(x.numel() / C);
    for (int64_t c = 0; c < C; c++) totals[C + c] /= n - 1;  // M2 -> unbiased variance, as Moments.unbiased_var
    const int rc = bn_update_running_unbiased(1, C, totals.data(), totals.data() + C, a->running_mean,
                                              a->running_var, momentum);
    if (rc == 0) a->bump_running();
    return py::make_tuple(y, rc == 0 ? 1 : 0);
}

}  // namespace

PYBIND11_MODULE(_bn_cpu_ext, m) {
    m.doc() = "The batchnorm CPU kernel's entry points in C++ (see bn_cpu_ext.cpp)";
    m.def("abi_version", &bn_abi_version);
    m.def("eval", &eval);
    m.def("train", &train);
    m.def("backward", &backward);
    m.def("train_step", &train_step);
    m.def("act_eval", &act_eval);
    m.def("act_train_step", &act_train_step);
    m.def("ghost_train_step", &ghost_train_step);
    m.def("set_output_pool_limit", [](size_t bytes) { OutputPool::current().set_limit(bytes); });
    m.def("output_pool", [] { return OutputPool::current().state(); });
    m.def("output_like", [](const at::Tensor &x) -> py::object {  // cpu._empty_like: None unless dense CPU
        return plain_cpu(x) && x.is_non_overlapping_and_dense() ? py::cast(output_like(x)) : py::none();
    });
}
