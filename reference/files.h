// moelab/reference/files.h — reading and writing whole files, atomically.
//
// Nothing the user made is lost: write_file_atomically writes a temporary file beside `path`,
// flushes and syncs it, then renames it onto `path`. A reader of `path` sees the old file or the
// whole new one, never a part; a failure leaves `path` as it was and removes the temporary file.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string_view>
#include <vector>

namespace moelab {

// Throws Error naming the path and the reason (no such directory, not writable, a directory in
// the way, disk full) if the file cannot be written; then `path` is unchanged.
void write_file_atomically(const std::filesystem::path& path, std::span<const std::uint8_t> bytes);
void write_file_atomically(const std::filesystem::path& path, std::string_view text);

// The whole file. Throws Error naming the path if it does not exist, is a directory or cannot be
// read.
std::vector<std::uint8_t> read_file(const std::filesystem::path& path);

// The two halves of write_file_atomically, for a writer that streams into the temporary file
// (JsonLinesFile). Both throw Error naming `path`.
// Creates a new, empty file beside `path` (same directory, so the rename cannot cross file
// systems) named ".<name>.tmp.<pid>.<n>"; O_EXCL makes it ours alone. Returns its path.
std::filesystem::path create_temp_file_beside(const std::filesystem::path& path);
// Syncs the finished file `temp` and renames it onto `path`; on failure removes `temp`.
void publish_temp_file(const std::filesystem::path& temp, const std::filesystem::path& path);

}  // namespace moelab
