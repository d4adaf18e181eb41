// A small design for yosys to synthesise: an 8-bit counter with load and enable, and its
// parity.
module counter(input clk, input rst, input en, input load, input [7:0] d,
               output reg [7:0] q, output parity);
  always @(posedge clk)
    if (rst) q <= 8'd0;
    else if (load) q <= d;
    else if (en) q <= q + 8'd1;
  assign parity = ^q;
endmodule
