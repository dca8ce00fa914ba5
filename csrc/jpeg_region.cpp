// Decode only a crop box of a JPEG: libjpeg-turbo's jpeg_crop_scanline (no IDCT or colour conversion left and right
// of the box), jpeg_skip_scanlines (none above it) and no decoding at all below it. The pixels are libjpeg-turbo's
// own (islow IDCT, fancy upsampling: PIL's and torchvision's settings), so the box equals the same box cut from a
// full decode.
//
// Used by the torch backend's CPU workers in place of torchvision's full decode_jpeg (same pixels, less work).
//
// Floor, measured before writing it (one core, 500x375 photo-like JPEGs of ~67 KB, libjpeg-turbo via PIL): full
// decode 1.0 ms, at DCT scale 1/8 0.56 ms. The 1/8 decode still entropy-decodes every coefficient: Huffman
// decoding is ~0.5 ms of the 1.0, and a box ending at a fraction f of the height needs f of it (rows above the
// box are entropy-decoded to be skipped; Huffman data has no random access). For torchvision's RandomResizedCrop
// boxes (f ~0.8 on average, ~55% of the area), predicted ~0.6 ms against ~0.9 for a full decode.
// Measured: 0.65 ms for the box, 0.76 for the whole image through this same function (isolated, one core); in
// the loader, 0.70 against torchvision's 0.90. DALI's CPU image_slice, also libjpeg-turbo, costs about the same.
// A band of 64 rows costs 0.16 ms at the top of the image and 0.52 at its bottom: skipping the rows above is
// entropy decoding, which dominates these pictures.
// Tried and dropped: decoding large boxes at a reduced DCT scale (scale_num/8, the smallest keeping the box
// >= 224): 0.73 ms, slower, as libjpeg-turbo's M/8 IDCTs (M != 1, 2, 4, 8) and their upsampling have no SIMD code
// (1/2 does: it saved 18% of decode + resize on 1000x750 pictures, but a 224 crop of 500x375 never allows it);
// plain (non-fancy) chroma upsampling: slower here, and not PIL's pixels.
//
// Returns (height, width, 3) uint8 RGB. Throws with libjpeg's message when the data does not decode; returns an
// empty tensor for what this decoder leaves to others (CMYK and YCCK, which libjpeg-turbo does not turn into RGB).

#include <torch/extension.h>

#include <jpeglib.h>

#include <algorithm>
#include <csetjmp>
#include <vector>

namespace {

struct ErrorManager {
  jpeg_error_mgr base;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void on_error(j_common_ptr cinfo) {
  auto* errors = reinterpret_cast<ErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, errors->message);
  std::longjmp(errors->jump, 1);
}

// Warnings (corrupt entropy data, a premature end) are libjpeg's to recover from, as PIL and torchvision
// let it: the default would print them to stderr.
void on_message(j_common_ptr) {}

torch::Tensor decode_region(const py::bytes& data, int64_t left, int64_t top, int64_t width, int64_t height) {
  char* bytes = nullptr;
  Py_ssize_t size = 0;
  if (PyBytes_AsStringAndSize(data.ptr(), &bytes, &size) != 0) throw py::error_already_set();
  TORCH_CHECK(width > 0 && height > 0 && left >= 0 && top >= 0, "decode_region: empty or negative box");

  py::gil_scoped_release no_gil;  // `data` stays referenced by the caller; nothing below touches Python
  jpeg_decompress_struct cinfo;
  ErrorManager errors;
  cinfo.err = jpeg_std_error(&errors.base);
  errors.base.error_exit = on_error;
  errors.base.output_message = on_message;
  std::vector<uint8_t> row;
  // Declared before setjmp: locals changed after it are indeterminate after the longjmp.
  torch::Tensor out;
  if (setjmp(errors.jump)) {
    jpeg_destroy_decompress(&cinfo);
    TORCH_CHECK(false, "JPEG decode failed: ", errors.message);
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, reinterpret_cast<const unsigned char*>(bytes), static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    return torch::empty({0, 0, 3}, torch::kUInt8);
  }
  if (left + width > cinfo.image_width || top + height > cinfo.image_height) {
    const JDIMENSION image_width = cinfo.image_width, image_height = cinfo.image_height;
    jpeg_destroy_decompress(&cinfo);
    TORCH_CHECK(false, "decode_region: box outside the ", image_width, "x", image_height, " image");
  }
  cinfo.out_color_space = JCS_RGB;
  jpeg_start_decompress(&cinfo);

  // crop_scanline widens the columns to whole iMCUs: xoffset moves left, the width grows. Fancy upsampling treats
  // the first and last columns it decodes as the image's edges, and turns itself off under 2 chroma columns
  // (libjpeg.txt, "Decompressing partial scanlines"): decode a column more on each side of the box, 3 at least,
  // so that its edge pixels get the chroma of their neighbours, and cut them off.
  const int64_t image_width = cinfo.output_width;
  JDIMENSION xoffset = static_cast<JDIMENSION>(std::max<int64_t>(0, std::min(left - 1, image_width - 3)));
  const int64_t end = std::min(image_width, std::max<int64_t>(left + width + 1, xoffset + 3));
  JDIMENSION columns = static_cast<JDIMENSION>(end - xoffset);
  jpeg_crop_scanline(&cinfo, &xoffset, &columns);
  if (top > 0) jpeg_skip_scanlines(&cinfo, static_cast<JDIMENSION>(top));
  out = torch::empty({height, width, 3}, torch::kUInt8);
  row.resize(static_cast<size_t>(columns) * 3);
  uint8_t* target = out.data_ptr<uint8_t>();
  const size_t skip = static_cast<size_t>(left - xoffset) * 3;
  const size_t row_bytes = static_cast<size_t>(width) * 3;
  for (int64_t y = 0; y < height; ++y) {
    JSAMPROW rows[1] = {row.data()};
    jpeg_read_scanlines(&cinfo, rows, 1);
    std::copy_n(row.data() + skip, row_bytes, target + y * row_bytes);
  }
  // Rows below the box are never decoded: abort instead of finish (which wants every scanline read).
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_region", &decode_region,
        "(height, width, 3) uint8 RGB of the box of a JPEG; empty for CMYK/YCCK; raises if it does not decode",
        py::arg("data"), py::arg("left"), py::arg("top"), py::arg("width"), py::arg("height"));
}
