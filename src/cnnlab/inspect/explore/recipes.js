// The drawing pad's preparation: a port of cnnlab.use.recipes (what `cnnlab predict` and `serve` do to a
// picture), step by step and with Pillow's own arithmetic where Pillow does a step, so a drawing gives the
// model here the pixels it gets from `cnnlab predict drawing.png`. Keep the two in step: tests/test_explore.py
// draws the same strokes here and on the web demo and compares both with `predict`.
// Input: a canvas's RGBA ImageData (opaque). Output: uint8 pixels (C, H, W) in a Uint8Array, as the recipe's.
"use strict";

class BlankImage extends Error {}

// Python's round(): halves go to the even neighbour (round(2.5) == 2), as the recipes' round() calls do.
function roundHalfEven(v) {
  const r = Math.round(v);
  return Math.abs(v % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// Pillow's convert("L") from RGB: ITU-R 601 luma in 16-bit fixed point, rounded.
function pillowGrey(rgba, n) {
  const grey = new Float64Array(n);
  for (let i = 0; i < n; i++)
    grey[i] = Math.floor((rgba[4 * i] * 19595 + rgba[4 * i + 1] * 38470 + rgba[4 * i + 2] * 7471 + 0x8000) / 65536);
  return grey;
}

// ------------------------------------------------------------ Pillow's Lanczos resampling (Resample.c)
function lanczos(x) {
  const sinc = v => { if (v === 0) return 1; v *= Math.PI; return Math.sin(v) / v; };
  return x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0;
}
// For each output index: [first input index, weights], over input [in0, in1) of an axis of inSize pixels.
function lanczosCoefficients(inSize, in0, in1, outSize) {
  const scale = (in1 - in0) / outSize, filterscale = Math.max(scale, 1), support = 3 * filterscale;
  const out = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    const k = [];
    let ww = 0;
    for (let x = 0; x < xmax; x++) { const w = lanczos((x + xmin - center + 0.5) / filterscale); k.push(w); ww += w; }
    out.push([xmin, ww !== 0 ? k.map(w => w / ww) : k]);
  }
  return out;
}
// Pillow's 8-bit path: weights in 22-bit fixed point, each pass rounded and clipped to 0..255.
function fixedPoint(coefficients) {
  return coefficients.map(([xmin, k]) => [xmin, k.map(w => Math.trunc(w < 0 ? -0.5 + w * 4194304 : 0.5 + w * 4194304))]);
}
function clip8(sum) { return sum <= 0 ? 0 : sum >= 255 * 4194304 * 2 ? 255 : Math.min(255, Math.floor(sum / 4194304)); }
// Resize planes (each Float64Array H x W) to outH x outW over the box [left, top, right, bottom]: horizontal
// pass on the rows the vertical pass reads, then the vertical pass, as ImagingResampleInner does.
function lanczosResize(planes, H, W, outH, outW, box, eightBit) {
  const [left, top, right, bottom] = box || [0, 0, W, H];
  let horizontal = lanczosCoefficients(W, left, right, outW), vertical = lanczosCoefficients(H, top, bottom, outH);
  if (eightBit) { horizontal = fixedPoint(horizontal); vertical = fixedPoint(vertical); }
  const needH = outW !== W || left !== 0 || right !== outW, needV = outH !== H || top !== 0 || bottom !== outH;
  const first = vertical[0][0], last = vertical[outH - 1][0] + vertical[outH - 1][1].length;
  const pass = (value, [xmin, k]) => {
    let sum = eightBit ? 2097152 : 0;  // 1 << 21: the rounding half of the fixed point
    for (let x = 0; x < k.length; x++) sum += value(xmin + x) * k[x];
    return eightBit ? clip8(sum) : Math.fround(sum);  // float images store float32
  };
  return planes.map(plane => {
    let rows = plane, rowsH = H, offset = 0, width = W;
    if (needH) {
      rowsH = last - first; offset = first; width = outW;
      rows = new Float64Array(rowsH * outW);
      for (let y = 0; y < rowsH; y++) for (let xx = 0; xx < outW; xx++)
        rows[y * outW + xx] = pass(x => plane[(y + first) * W + x], horizontal[xx]);
    }
    if (!needV) return rows;
    const out = new Float64Array(outH * width);
    for (let yy = 0; yy < outH; yy++) for (let x = 0; x < width; x++)
      out[yy * width + x] = pass(y => rows[(y - (needH ? offset : 0)) * width + x], vertical[yy]);
    return out;
  });
}

// ------------------------------------------------------------ digits (MNIST): recipes.prepare_digit
const WORK_SIDE = 256;

function median(values) {
  const s = Float64Array.from(values).sort(), n = s.length;
  return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}
function borderOf(a, H, W) {
  const out = [];
  for (let x = 0; x < W; x++) out.push(a[x]);
  for (let x = 0; x < W; x++) out.push(a[(H - 1) * W + x]);
  for (let y = 0; y < H; y++) out.push(a[y * W]);
  for (let y = 0; y < H; y++) out.push(a[y * W + W - 1]);
  return out;
}
function otsuThreshold(grey) {
  const counts = new Float64Array(256);
  for (const v of grey) counts[Math.min(255, Math.max(0, Math.trunc(v)))]++;
  const weightLow = new Float64Array(256), sumLow = new Float64Array(256);
  let w = 0, s = 0;
  for (let i = 0; i < 256; i++) { w += counts[i]; s += counts[i] * i; weightLow[i] = w; sumLow[i] = s; }
  const between = new Float64Array(256);
  for (let i = 0; i < 256; i++) {
    const high = w - weightLow[i];
    const meanLow = weightLow[i] > 0 ? sumLow[i] / weightLow[i] : 0, meanHigh = high > 0 ? (s - sumLow[i]) / high : 0;
    between[i] = weightLow[i] * high * (meanLow - meanHigh) ** 2;
  }
  const top = Math.max(...between), best = [];
  between.forEach((v, i) => { if (v >= top * (1 - 1e-9)) best.push(i); });
  return (best[0] + best[best.length - 1]) / 2;
}
function percentile(values, q) {  // NumPy's default (linear) percentile
  const s = Float64Array.from(values).sort(), pos = q / 100 * (s.length - 1), lo = Math.floor(pos);
  return lo + 1 < s.length ? s[lo] + (s[lo + 1] - s[lo]) * (pos - lo) : s[lo];
}
function inkOnBlack(grey) {
  let low = Infinity, high = -Infinity;
  for (const v of grey) { low = Math.min(low, v); high = Math.max(high, v); }
  if (high - low < 24) throw new BlankImage("no ink found: the picture is blank or too faint");
  const threshold = otsuThreshold(grey);
  const background = grey.filter(v => v <= threshold + 0.5), above = grey.filter(v => v > threshold);
  const mean = background.reduce((a, b) => a + b, 0) / background.length;
  const std = Math.sqrt(background.reduce((a, b) => a + (b - mean) ** 2, 0) / background.length);
  const floor = Math.min(mean + 3 * std, threshold);
  const inkLevel = above.length ? percentile(above, 95) : high;
  const range = Math.max(inkLevel - floor, 1);
  return grey.map(v => Math.min(1, Math.max(0, (v - floor) / range)));
}
function massSpan(sums, total, trim) {  // first and one-past-last index with cumulative mass inside [trim, 1 - trim]
  let cumulative = 0, start = sums.length, end = sums.length - 1;
  for (let i = 0; i < sums.length; i++) {
    cumulative += sums[i] / total;
    if (start === sums.length && cumulative > trim) start = i;
    if (cumulative >= 1 - trim) { end = i; break; }
  }
  return [start, Math.max(end + 1, start + 1)];
}
function inkBox(ink, H, W, trim = 0.002) {  // [top, bottom, left, right], exclusive ends
  const rows = new Float64Array(H), columns = new Float64Array(W);
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) { rows[y] += ink[y * W + x]; columns[x] += ink[y * W + x]; }
  const total = rows.reduce((a, b) => a + b, 0);
  if (total <= 0) throw new BlankImage("no ink found: the picture is blank or too faint");
  return [...massSpan(rows, total, trim), ...massSpan(columns, total, trim)];
}
function cropped(a, W, [top, bottom, left, right]) {
  const w = right - left, out = new Float64Array((bottom - top) * w);
  for (let y = top; y < bottom; y++) for (let x = left; x < right; x++) out[(y - top) * w + x - left] = a[y * W + x];
  return [out, bottom - top, w];
}
function maxPoolTo(a, H, W, side) {  // each factor x factor block keeps its brightest pixel
  const factor = Math.ceil(Math.max(H, W) / side);
  if (factor <= 1) return [a, H, W];
  const h = Math.ceil(H / factor), w = Math.ceil(W / factor), out = new Float64Array(h * w).fill(-Infinity);
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    const i = Math.floor(y / factor) * w + Math.floor(x / factor);
    out[i] = Math.max(out[i], a[y * W + x]);
  }
  return [out, h, w];
}
function strokeWidth(ink, H, W) {  // ink area / half its outline
  const on = (y, x) => y >= 0 && y < H && x >= 0 && x < W && ink[y * W + x] > 0.5;
  let area = 0, outline = 0;
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    if (!on(y, x)) continue;
    area++;
    if (!(on(y - 1, x) && on(y + 1, x) && on(y, x - 1) && on(y, x + 1))) outline++;
  }
  return area === 0 ? 0 : area / Math.max(outline / 2, 1);
}
function thickenThinStrokes(ink, H, W, box, target = 2.0) {  // Pillow's MaxFilter on uint8, edges repeated
  const scale = box / Math.max(H, W), width = strokeWidth(ink, H, W);
  if (scale >= 1 || width * scale >= 1.5) return ink;
  const grow = roundHalfEven(target / scale - width);
  if (grow < 2) return ink;
  const size = grow % 2 === 0 ? grow + 1 : grow, r = (size - 1) / 2, out = new Float64Array(H * W);
  const bytes = ink.map(v => Math.trunc(v * 255));
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    let m = 0;
    for (let dy = -r; dy <= r; dy++) for (let dx = -r; dx <= r; dx++) {
      const yy = Math.min(H - 1, Math.max(0, y + dy)), xx = Math.min(W - 1, Math.max(0, x + dx));
      m = Math.max(m, bytes[yy * W + xx]);
    }
    out[y * W + x] = m / 255;
  }
  return out;
}
function fitWithin(ink, H, W, box) {  // Lanczos (float image) to a longest side of box, then scaled to peak 1
  const scale = box / Math.max(H, W);
  const w = Math.max(1, roundHalfEven(W * scale)), h = Math.max(1, roundHalfEven(H * scale));
  const [fitted] = lanczosResize([Float64Array.from(ink, Math.fround)], H, W, h, w, null, false);
  const peak = Math.max(0, ...fitted);
  return [fitted.map(v => { const c = Math.max(v, 0); return peak > 0 ? c / peak : c; }), h, w];
}
function placeByCentreOfMass(fitted, h, w, size) {
  let total = 0, rowSum = 0, columnSum = 0;
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const v = fitted[y * w + x];
    total += v; rowSum += y * v; columnSum += x * v;
  }
  const top = Math.min(Math.max(roundHalfEven(size / 2 - rowSum / total), 0), size - h);
  const left = Math.min(Math.max(roundHalfEven(size / 2 - columnSum / total), 0), size - w);
  const out = new Uint8Array(size * size);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++)
    out[(top + y) * size + left + x] = roundHalfEven(fitted[y * w + x] * 255);
  return out;
}
function prepareDigit(rgba, H, W, size) {
  const box = roundHalfEven(size * 20 / 28);
  let grey = pillowGrey(rgba, H * W);
  if (median(borderOf(grey, H, W)) > 127.5) grey = grey.map(v => 255 - v);  // dark ink on paper: MNIST's is light
  const ink = inkOnBlack(grey);
  const [inked, h0, w0] = maxPoolTo(...cropped(ink, W, inkBox(ink, H, W)), WORK_SIDE);
  const [fitted, h, w] = fitWithin(thickenThinStrokes(inked, h0, w0, box), h0, w0, box);
  return placeByCentreOfMass(fitted, h, w, size);
}

// ------------------------------------------------------------ photos (CIFAR-10, colour folders): images.read_pixels
const REDUCING_GAP = 3;
function preparePhoto(rgba, H, W, size, channels) {
  // The canvas is square, so the largest centred square is all of it; Pillow first box-averages by an integer
  // factor when the picture is over 3x the size (reducing_gap), then resamples.
  let planes = channels === 3 ? [0, 1, 2].map(k => Float64Array.from({ length: H * W }, (_, i) => rgba[4 * i + k]))
    : [pillowGrey(rgba, H * W)];
  let h = H, w = W;
  const factor = Math.trunc(Math.min(H, W) / size / REDUCING_GAP) || 1;
  if (factor > 1) {
    h = Math.ceil(H / factor); w = Math.ceil(W / factor);
    planes = planes.map(plane => pillowReduce(plane, H, W, factor, h, w));
  }
  const box = [0, 0, W / factor, H / factor];  // the crop box in the reduced picture's pixels
  const out = lanczosResize(planes, h, w, size, size, box, true);
  const pixels = new Uint8Array(channels * size * size);
  out.forEach((plane, c) => pixels.set(plane, c * size * size));
  return pixels;
}
function pillowReduce(plane, H, W, factor, h, w) {  // Image.reduce: the mean of each block, rounded
  const out = new Float64Array(h * w);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    let sum = 0, count = 0;
    for (let dy = 0; dy < factor && y * factor + dy < H; dy++)
      for (let dx = 0; dx < factor && x * factor + dx < W; dx++) { sum += plane[(y * factor + dy) * W + x * factor + dx]; count++; }
    out[y * w + x] = Math.floor(sum / count + 0.5);
  }
  return out;
}

// ------------------------------------------------------------ objects (Fashion-MNIST): recipes.prepare_object
function prepareObject(rgba, H, W, size, tolerance = 0.05) {
  let planes = [0, 1, 2].map(k => Float64Array.from({ length: H * W }, (_, i) => rgba[4 * i + k]));
  const factor = Math.floor(Math.max(H, W) / (8 * size));  // recipes.shrunk: box-average a big picture first
  if (factor > 1) {
    const h = Math.ceil(H / factor), w = Math.ceil(W / factor);
    planes = planes.map(plane => pillowReduce(plane, H, W, factor, h, w));
    H = h; W = w;
  }
  const corners = [0, W - 1, (H - 1) * W, H * W - 1];
  const background = planes.map(plane => median(corners.map(i => plane[i])));
  const far = tolerance * 255 * Math.sqrt(3);  // "close to the corner colour": within 5% of the largest distance
  const mask = despeckle(Float64Array.from({ length: H * W }, (_, i) =>
    Math.sqrt(planes.reduce((a, plane, k) => a + (plane[i] - background[k]) ** 2, 0)) > far ? 1 : 0), H, W);
  if (!mask.some(v => v > 0)) throw new BlankImage("no object found: the picture is one colour");
  const luma = (r, g, b) => 0.299 * r + 0.587 * g + 0.114 * b;  // images.luminance
  const [grey, h, w] = cropped(Float64Array.from({ length: H * W }, (_, i) => luma(planes[0][i], planes[1][i], planes[2][i])),
    W, inkBox(mask, H, W, 0.001));
  const backgroundGrey = luma(...background);
  const scale = size / Math.max(h, w);  // recipes.resize_longest_side
  const rw = Math.max(1, roundHalfEven(w * scale)), rh = Math.max(1, roundHalfEven(h * scale));
  const bytes = grey.map(v => Math.min(255, Math.max(0, roundHalfEven(v))));
  const [resized] = lanczosResize([bytes], h, w, rh, rw, null, true);
  const sharpened = unsharpMask(resized, rh, rw);
  // ImageOps.pad(centering=(0.5, 0.5)): the longest side is already `size`, so it is only pasted in the middle
  const pixels = new Float64Array(size * size).fill(Math.min(255, Math.max(0, roundHalfEven(backgroundGrey))));
  const top = roundHalfEven((size - rh) * 0.5), left = roundHalfEven((size - rw) * 0.5);
  for (let y = 0; y < rh; y++) for (let x = 0; x < rw; x++) pixels[(top + y) * size + left + x] = sharpened[y * rw + x];
  let back = backgroundGrey, values = pixels;
  if (back > 127.5) { values = pixels.map(v => 255 - v); back = 255 - back; }  // light background: negate
  const stretch = 255 / Math.max(255 - back, 1);
  return Uint8Array.from(values, v => Math.min(255, Math.max(0, roundHalfEven((v - back) * stretch))));
}
function despeckle(mask, H, W) {  // Pillow's MedianFilter(3) (edges repeated) on a 0/1 mask
  const at = (y, x) => mask[Math.min(H - 1, Math.max(0, y)) * W + Math.min(W - 1, Math.max(0, x))];
  const out = new Float64Array(H * W);
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    let on = 0;
    for (let dy = -1; dy <= 1; dy++) for (let dx = -1; dx <= 1; dx++) on += at(y + dy, x + dx);
    out[y * W + x] = on >= 5 ? 1 : 0;
  }
  return out;
}
// ImageFilter.UnsharpMask(radius=1, percent=100, threshold=0) on uint8: 2·pixel − blurred, clipped, where the
// blur is Pillow's Gaussian: 3 passes of an extended box blur (BoxBlur.c), fixed point, edges repeated.
function unsharpMask(pixels, H, W) {
  const blurred = gaussianBlur(pixels, H, W, 1, 3);
  return pixels.map((v, i) => Math.min(255, Math.max(0, v + (v - blurred[i]))));
}
function gaussianBoxRadius(radius, passes) {  // BoxBlur.c's _gaussian_blur_radius, in float32 as there
  const f = Math.fround, sigma2 = f(f(radius * radius) / passes), L = f(Math.sqrt(f(f(12 * sigma2) + 1)));
  const l = Math.floor(f((L - 1) / 2));
  let a = f(f(2 * l + 1) * f(l * (l + 1) - f(3 * sigma2)));
  a = f(a / f(6 * f(sigma2 - (l + 1) * (l + 1))));
  return f(l + a);
}
function gaussianBlur(pixels, H, W, radius, passes) {
  const r = gaussianBoxRadius(radius, passes);
  let out = Float64Array.from(pixels);
  for (let i = 0; i < passes; i++) out = boxBlurRows(out, H, W, r);
  out = transpose(out, H, W);
  for (let i = 0; i < passes; i++) out = boxBlurRows(out, W, H, r);
  return transpose(out, W, H);
}
function boxBlurRows(a, H, W, floatRadius) {
  const radius = Math.trunc(floatRadius);
  const ww = Math.trunc(Math.fround(16777216 / Math.fround(floatRadius * 2 + 1)));  // float division, as in C
  const fw = Math.floor((16777216 - (radius * 2 + 1) * ww) / 2);
  const out = new Float64Array(H * W);
  for (let y = 0; y < H; y++) {
    const at = x => a[y * W + Math.min(W - 1, Math.max(0, x))];
    for (let x = 0; x < W; x++) {
      let sum = 0;
      for (let i = x - radius; i <= x + radius; i++) sum += at(i);
      out[y * W + x] = Math.floor((sum * ww + (at(x - radius - 1) + at(x + radius + 1)) * fw + 8388608) / 16777216);
    }
  }
  return out;
}
function transpose(a, H, W) {
  const out = new Float64Array(H * W);
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) out[x * H + y] = a[y * W + x];
  return out;
}

// ------------------------------------------------------------ by recipe
// uint8 (C, H, W) for the model, from the canvas. Throws BlankImage when nothing was drawn.
function preparePicture(recipe, imageData, input) {
  const { height: H, width: W, data } = imageData;
  if (recipe === "digits") return prepareDigit(data, H, W, input.height);
  if (recipe === "photos" || recipe === "photos-grey") return preparePhoto(data, H, W, input.height, input.channels);
  if (recipe === "objects") return prepareObject(data, H, W, input.height);
  throw new Error(`unknown recipe ${recipe}`);
}
