// moelab/reference/files.cpp — see files.h. POSIX calls (open, write, fsync, rename), because
// std::ofstream can neither create a file exclusively nor sync it to disk.
#include "reference/files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <string>
#include <system_error>

#include "reference/error.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;

std::string errno_text(int error) { return std::error_code(error, std::generic_category()).message(); }

// A file we opened, closed on every path out (exceptions included).
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // Closes now and reports failure: on some file systems (NFS) a full disk shows up only here.
  bool close() {
    const int fd = fd_;
    fd_ = -1;
    return ::close(fd) == 0;
  }

 private:
  int fd_;
};

void require_file_name(const fs::path& path) {
  if (path.empty() || !path.has_filename()) fail("path", path.string(), "must name a file");
  std::error_code ec;
  if (fs::is_directory(path, ec)) fail("path", path.string(), "is a directory");
}

// Creates ".<name>.tmp.<pid>.<n>" beside `path`, open for writing. pid + counter keeps writers in
// other threads and processes apart; a stale file left by a crashed process is skipped (EEXIST).
int create_temp(const fs::path& path, fs::path& temp) {
  static std::atomic<unsigned> counter{0};
  // File names are at most 255 bytes; keep room for the suffix.
  const std::string name = path.filename().string().substr(0, 200);
  for (int attempt = 0; attempt < 100; ++attempt) {
    fs::path candidate = path.parent_path() / fmt::format(".{}.tmp.{}.{}", name, ::getpid(), counter++);
    const int fd = ::open(candidate.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0) {
      temp = std::move(candidate);
      return fd;
    }
    if (errno != EEXIST) {
      fail("path", path.string(), fmt::format("cannot create a temporary file beside it ({})", errno_text(errno)));
    }
  }
  fail("path", path.string(), "found no free temporary file name beside it");
}

// Removes the temporary file and throws; `path` was never touched.
[[noreturn]] void give_up(const fs::path& temp, const fs::path& path, std::string_view why) {
  std::error_code ec;
  fs::remove(temp, ec);
  fail("path", path.string(), why);
}

// Syncs before the rename, so that after a power cut `path` holds the old or the new content,
// never a renamed but empty file. Closes `fd` either way.
void sync_and_rename(Fd& fd, const fs::path& temp, const fs::path& path) {
  if (::fsync(fd.get()) != 0) give_up(temp, path, fmt::format("sync failed ({})", errno_text(errno)));
  if (!fd.close()) give_up(temp, path, fmt::format("closing the file failed ({})", errno_text(errno)));
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    give_up(temp, path, fmt::format("rename failed ({})", errno_text(errno)));
  }
  // Make the rename itself durable. Best effort: the new file is already in place, so a failure
  // here is no reason to report the write as failed.
  const fs::path dir = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    (void)::fsync(dir_fd);
    ::close(dir_fd);
  }
}

}  // namespace

fs::path create_temp_file_beside(const fs::path& path) {
  require_file_name(path);
  fs::path temp;
  ::close(create_temp(path, temp));
  return temp;
}

void publish_temp_file(const fs::path& temp, const fs::path& path) {
  Fd fd(::open(temp.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) give_up(temp, path, fmt::format("cannot reopen the temporary file ({})", errno_text(errno)));
  sync_and_rename(fd, temp, path);
}

void write_file_atomically(const fs::path& path, std::span<const std::uint8_t> bytes) {
  require_file_name(path);
  fs::path temp;
  Fd fd(create_temp(path, temp));
  // write() may write less than asked (a signal, a pipe-like file system): loop until done.
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) give_up(temp, path, fmt::format("writing failed ({})", errno_text(n < 0 ? errno : EIO)));
    done += static_cast<std::size_t>(n);
  }
  sync_and_rename(fd, temp, path);
}

void write_file_atomically(const fs::path& path, std::string_view text) {
  write_file_atomically(path, std::span(reinterpret_cast<const std::uint8_t*>(text.data()), text.size()));
}

std::vector<std::uint8_t> read_file(const fs::path& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    fail("path", path.string(), errno == ENOENT ? std::string("no such file")
                                                : fmt::format("cannot open for reading ({})", errno_text(errno)));
  }
  struct stat info {};
  if (::fstat(fd.get(), &info) != 0) fail("path", path.string(), fmt::format("cannot stat ({})", errno_text(errno)));
  if (S_ISDIR(info.st_mode)) fail("path", path.string(), "is a directory, not a file");
  // The size is a hint only (files in /proc report 0, a file may grow): read until end of file.
  std::vector<std::uint8_t> bytes;
  bytes.reserve(S_ISREG(info.st_mode) ? static_cast<std::size_t>(info.st_size) : 0);
  std::uint8_t chunk[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd.get(), chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("path", path.string(), fmt::format("reading failed ({})", errno_text(errno)));
    if (n == 0) break;
    bytes.insert(bytes.end(), chunk, chunk + n);
  }
  return bytes;
}

}  // namespace moelab
